"""The task commands: caption, answer, ocr, generate (text), detect, segment (objects) and chat, through the pipeline."""

from __future__ import annotations

import json
import sys
import time

from nanopali.cli.common import generation, load, task_options

OUT_HELP = "draw the objects to this image file (.png, .jpg, .webp ...; checked before the model is loaded)"


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
    task("detect", "find objects: boxes", ("labels", '"cat" or "cat ; dog"'), run=run_objects).add_argument("--out", help=OUT_HELP)
    task("segment", "find objects: masks", ("labels", '"cat" or "cat ; dog"'), run=run_objects).add_argument("--out", help=OUT_HELP)
    task("chat", "type prompts about one image; an empty line or EOF ends (exit status 2 if a line was refused)",
         run=run_chat)


def _prompt(args) -> str:
    return {"caption": lambda: f"caption {args.lang}", "answer": lambda: f"answer {args.lang} {args.question}",
            "ocr": lambda: "ocr", "generate": lambda: args.prompt}[args.command]()


def _check_text_args(args) -> None:
    """The text given on the command line is valid text (an undecodable byte in argv is a lone surrogate)."""
    from nanopali.inputs.tokenizer import check_text

    for name, what in (("lang", "--lang"), ("question", "the question"), ("prompt", "the prompt"), ("labels", "the labels")):
        value = getattr(args, name, None)
        if isinstance(value, str):
            check_text(value, what)


def _report(args, pali, text: str, seconds: float, prompt: str) -> None:
    tokens = pali.stats.get("new_tokens") if not args.stream else len(pali.processor.tokenizer.encode(text))
    if args.json:
        print(json.dumps({"task": args.command, "prompt": prompt, "text": text, "new_tokens": tokens, "seconds": seconds}))
    if args.verbose:
        print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def run_text(args) -> int:
    from nanopali.inputs.images import load_image

    _check_text_args(args)
    generation(args)  # every option checked before the model is loaded
    pali, prompt = load(args), _prompt(args)
    image = load_image(args.image)
    kw = generation(args, pali.model.device)
    args.stream = args.stream and not args.json and kw["num_beams"] == 1
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


NO_OBJECTS = {"detect": "no detections", "segment": "no segmentations"}


def run_objects(args) -> int:
    from nanopali.errors import UsageError
    from nanopali.inputs.images import load_image
    from nanopali.tasks import draw
    from nanopali.tasks.drawing import check_output

    _check_text_args(args)
    generation(args)  # every option and the output path checked before the model is loaded
    out, out_format = check_output(args.out, "the drawing (--out)") if args.out else (None, None)
    labels = [x.strip() for x in args.labels.split(";") if x.strip()]
    if not labels:
        raise UsageError(f"{args.command} needs one or more labels, e.g. \"cat\" or \"cat ; dog\"; got {args.labels!r}")
    pali = load(args)
    image = load_image(args.image)
    start = time.perf_counter()
    objects = getattr(pali, args.command)(image, labels, **generation(args, pali.model.device))
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"task": args.command, "labels": labels, "text": objects.text, "seconds": seconds,
                          "objects": [{"label": o.label, "box": list(o.box), "score": o.score,
                                       **({"mask_pixels": int(o.mask.sum())} if hasattr(o, "mask") else {})}
                                      for o in objects],
                          "dropped": [{"text": d[0], "reason": d[1]} for d in objects.dropped],
                          "out": args.out}), flush=True)
    else:
        for o in objects:
            print(f"{o.label}\t{' '.join(map(str, o.box))}\t{o.score:.3f}")
        if not objects:
            print(f"({NO_OBJECTS[args.command]}; the model answered {objects.text!r})", file=sys.stderr)
        sys.stdout.flush()
    if out is not None:  # after the results are printed, so that a full disk loses only the drawing
        try:
            draw(image, objects).save(out, format=out_format)
        except OSError as e:
            raise UsageError(f"cannot write the drawing (--out) to {out}: {e.strerror or e}") from None
    if args.verbose:
        print(f"[{pali.stats['new_tokens']} tokens in {seconds:.2f} s]", file=sys.stderr)
    return 0


def run_chat(args) -> int:
    """One answer per line of stdin; a line that cannot be answered (not valid text, too long for the model, …)
    gets one `nanopali: error: …` line and the session goes on. Exit status 2 if any line was refused."""
    from nanopali.errors import NanopaliError
    from nanopali.inputs.images import load_image
    from nanopali.inputs.tokenizer import check_text

    generation(args)  # every option checked before the model is loaded
    pali = load(args)
    image = load_image(args.image)
    print("image loaded; type a prompt (e.g. 'caption en', 'answer en what is this?'), empty line to quit",
          file=sys.stderr)
    kw = generation(args, pali.model.device)
    refused = 0
    for number, line in enumerate(_lines(sys.stdin), 1):
        prompt = line.strip()
        if not prompt:
            break
        printed = False
        try:
            check_text(prompt, "the prompt")
            for piece in pali.stream(image, prompt, **kw):  # checks the prompt before the first piece
                print(piece, end="", flush=True)
                printed = True
        except NanopaliError as e:
            refused += 1
            if printed:
                print(flush=True)
            print(f"nanopali: error: line {number}: {e}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
    return 2 if refused else 0


def _lines(stream):
    """The lines of a text stream; read through its byte buffer when it has one, so that an undecodable byte
    becomes a lone surrogate that its line is refused for, instead of a UnicodeDecodeError ending the loop."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        yield from stream
        return
    encoding = getattr(stream, "encoding", None) or "utf-8"
    for raw in buffer:
        yield raw.decode(encoding, "surrogateescape")
