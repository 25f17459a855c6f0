"""The task commands: caption, answer, ocr, generate (text), detect, segment (objects) and chat, through the pipeline."""

from __future__ import annotations

import json
import sys
import time

from nanopali.cli.common import generation, load, task_options


def add_commands(sub) -> None:
    common = task_options()

    def task(name, help, *positional, run):
        s = sub.add_parser(name, parents=[common], help=help)
        s.add_argument("image")
        for arg, arg_help in positional:
            s.add_argument(arg, help=arg_help)
        s.set_defaults(run=run)
        return s
    task("caption", "describe an image", run=run_text).add_argument("--lang", default="en")
    task("answer", "answer a question about an image", ("question", "the question"), run=run_text).add_argument("--lang", default="en")
    task("ocr", "read the text in an image", run=run_text)
    task("generate", "run any PaliGemma prompt", ("prompt", 'e.g. "caption es" or "detect car"'), run=run_text)
    task("detect", "find objects: boxes", ("labels", '"cat" or "cat ; dog"'), run=run_objects).add_argument("--out", help="draw to this PNG")
    task("segment", "find objects: masks", ("labels", '"cat" or "cat ; dog"'), run=run_objects).add_argument("--out", help="draw to this PNG")
    task("chat", "type prompts about one image; an empty line or EOF ends", run=run_chat)


def _prompt(args) -> str:
    return {"caption": lambda: f"caption {args.lang}", "answer": lambda: f"answer {args.lang} {args.question}",
            "ocr": lambda: "ocr", "generate": lambda: args.prompt}[args.command]()


def _report(args, pali, text: str, seconds: float, prompt: str) -> None:
    tokens = pali.stats.get("new_tokens") if not args.stream else len(pali.processor.tokenizer.encode(text))
    if args.json:
        print(json.dumps({"task": args.command, "prompt": prompt, "text": text, "new_tokens": tokens, "seconds": seconds}))
    if args.verbose:
        print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def run_text(args) -> int:
    from nanopali.inputs.images import load_image
    from nanopali.pipeline import TASK_TOKENS

    pali, prompt = load(args), _prompt(args)
    image = load_image(args.image)
    args.stream = args.stream and not args.json and args.num_beams == 1
    kw = {"max_new_tokens": TASK_TOKENS[args.command], **generation(args)}
    start = time.perf_counter()
    if args.stream:
        kw.pop("num_beams")
        text = ""
        for piece in pali.stream(image, prompt, **kw):
            print(piece, end="", flush=True)
            text += piece
        print()
    else:
        text = pali.generate(image, prompt, **kw)
        if not args.json:
            print(text)
    _report(args, pali, text, time.perf_counter() - start, prompt)
    return 0


def run_objects(args) -> int:
    from nanopali.inputs.images import load_image
    from nanopali.tasks import draw

    pali = load(args)
    image = load_image(args.image)
    labels = [x.strip() for x in args.labels.split(";") if x.strip()]
    start = time.perf_counter()
    objects = getattr(pali, args.command)(image, labels, **generation(args))
    seconds = time.perf_counter() - start
    if args.out:
        draw(image, objects, args.out)
    if args.json:
        print(json.dumps({"task": args.command, "labels": labels, "text": objects.text, "seconds": seconds,
                          "objects": [{"label": o.label, "box": list(o.box), "score": o.score,
                                       **({"mask_pixels": int(o.mask.sum())} if hasattr(o, "mask") else {})}
                                      for o in objects],
                          "dropped": [{"text": d[0], "reason": d[1]} for d in objects.dropped],
                          "out": args.out}))
    else:
        for o in objects:
            print(f"{o.label}\t{' '.join(map(str, o.box))}\t{o.score:.3f}")
        if not objects:
            print(f"(no {args.command}ions; the model answered {objects.text!r})", file=sys.stderr)
    if args.verbose:
        print(f"[{pali.stats['new_tokens']} tokens in {seconds:.2f} s]", file=sys.stderr)
    return 0


def run_chat(args) -> int:
    from nanopali.inputs.images import load_image

    pali = load(args)
    image = load_image(args.image)
    print("image loaded; type a prompt (e.g. 'caption en', 'answer en what is this?'), empty line to quit",
          file=sys.stderr)
    kw = {k: v for k, v in generation(args).items() if k != "num_beams"}
    for line in sys.stdin:
        prompt = line.strip()
        if not prompt:
            break
        for piece in pali.stream(image, prompt, **kw):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0
