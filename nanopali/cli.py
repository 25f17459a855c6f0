"""The `nanopali` command (also `python -m nanopali`): every task from a terminal, through the pipeline.

    nanopali caption  IMAGE [--model DIR]               nanopali detect  IMAGE "cat ; dog" --out boxes.png
    nanopali answer   IMAGE "question"                  nanopali segment IMAGE "cat" --out mask.png
    nanopali ocr      IMAGE                             nanopali generate IMAGE "any prompt"
    nanopali chat     IMAGE                             nanopali info [DIR]
    nanopali train    --model DIR --data train.jsonl --out runs/x [--config train.json]

Without --model a command uses the shipped default model (paths.py): a small PaliGemma trained on
nanopali's toy shapes world, which knows only that world; $NANOPALI_DEFAULT_MODEL names another default.
train always needs --model: to fine-tune the shipped model, pass its directory (`nanopali info` prints it).

A user mistake (missing image, bad model path, bad data) prints one `nanopali: error: …` line and
exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from .config import ConfigError, PaliGemmaConfig
from .images import ImageError, load_image
from .model import PaliGemma
from .paths import ENV_VAR, default_model_dir
from .pipeline import TASK_TOKENS, load
from .quantize import MODES
from .tasks import draw
from .tokenizer import TokenizerError
from .train import DataError, TrainConfig, fit
from .weights import CheckpointError, checkpoint_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_HELP = ("checkpoint directory in Hugging Face layout; default: the shipped model, a small PaliGemma trained on "
              f"nanopali's toy shapes world that knows only that world (${ENV_VAR} overrides the default)")
TRAIN_MODEL_HELP = "checkpoint to start from, never a default: for the shipped model pass its directory (`nanopali info`)"
USER_ERRORS = (CheckpointError, ConfigError, ImageError, TokenizerError, DataError, FileNotFoundError, ValueError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanopali", description="PaliGemma and PaliGemma 2 in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help=MODEL_HELP)
    common.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    common.add_argument("--device", default="cpu")
    common.add_argument("--max-new-tokens", type=int, help="default depends on the task")
    common.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    common.add_argument("--top-p", type=float, default=1.0)
    common.add_argument("--top-k", type=int, default=0)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--num-beams", type=int, default=1)
    common.add_argument("--json", action=argparse.BooleanOptionalAction, default=False, help="print a JSON result")
    common.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print text as it comes")
    common.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False, help="latency and tokens/s")
    common.add_argument("--vae", help="mask VQ-VAE (vae-oid.npz) for segment; default: next to the model")
    common.add_argument("--quantize", choices=list(MODES), help="quantize the decoder weights after loading (faster decoding; int4 is coarser)")
    common.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="fast.py's CPU kernels (measured one-row products, fused gelu/RMSNorm), CUDA-graph "
                             "decode step (GPU); --no-fast: none of them, plain PyTorch (for debugging)")

    def task(name, help, *positional):
        s = sub.add_parser(name, parents=[common], help=help)
        s.add_argument("image")
        for arg, arg_help in positional:
            s.add_argument(arg, help=arg_help)
        return s
    task("caption", "describe an image").add_argument("--lang", default="en")
    task("answer", "answer a question about an image", ("question", "the question")).add_argument("--lang", default="en")
    task("ocr", "read the text in an image")
    task("generate", "run any PaliGemma prompt", ("prompt", 'e.g. "caption es" or "detect car"'))
    task("detect", "find objects: boxes", ("labels", '"cat" or "cat ; dog"')).add_argument("--out", help="draw to this PNG")
    task("segment", "find objects: masks", ("labels", '"cat" or "cat ; dog"')).add_argument("--out", help="draw to this PNG")
    task("chat", "type prompts about one image; an empty line or EOF ends")
    info = sub.add_parser("info", help="describe a checkpoint directory")
    info.add_argument("model_dir", nargs="?", help="default: the shipped model")
    info.add_argument("--json", action=argparse.BooleanOptionalAction, default=False)
    train = sub.add_parser("train", help="fine-tune on a JSONL of image/prefix/suffix examples")
    train.add_argument("--config", help="JSON file of training options; command-line options win")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "lr_scale":
            train.add_argument(flag, type=json.loads, default=None, help='JSON, e.g. \'{"multi_modal_projector.*": 10}\'')
        elif str(f.type).startswith(("tuple", "list")):
            train.add_argument(flag, nargs="+", default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            train.add_argument(flag, type=kind, default=None, help=TRAIN_MODEL_HELP if f.name == "model" else None)
    return p


def _generation(args) -> dict:
    kw = {"num_beams": args.num_beams}
    if args.max_new_tokens:
        kw["max_new_tokens"] = args.max_new_tokens
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  generator=torch.Generator().manual_seed(args.seed))
    return kw


def _load(args):
    return load(args.model, dtype=DTYPES[args.dtype], device=args.device, vae=args.vae, progress=sys.stderr.isatty(),
                quantize=args.quantize, fast=args.fast)


def _report(args, pali, text: str, seconds: float, prompt: str) -> None:
    tokens = pali.stats.get("new_tokens") if not args.stream else len(pali.processor.tokenizer.encode(text))
    if args.json:
        print(json.dumps({"task": args.command, "prompt": prompt, "text": text, "new_tokens": tokens, "seconds": seconds}))
    if args.verbose:
        print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def _prompt(args) -> str:
    return {"caption": lambda: f"caption {args.lang}", "answer": lambda: f"answer {args.lang} {args.question}",
            "ocr": lambda: "ocr", "generate": lambda: args.prompt}[args.command]()


def run_text(args) -> int:
    pali, prompt = _load(args), _prompt(args)
    image = load_image(args.image)
    args.stream = args.stream and not args.json and args.num_beams == 1
    kw = {"max_new_tokens": TASK_TOKENS[args.command], **_generation(args)}
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
    pali = _load(args)
    image = load_image(args.image)
    labels = [x.strip() for x in args.labels.split(";") if x.strip()]
    start = time.perf_counter()
    objects = getattr(pali, args.command)(image, labels, **_generation(args))
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
    pali = _load(args)
    image = load_image(args.image)
    print("image loaded; type a prompt (e.g. 'caption en', 'answer en what is this?'), empty line to quit",
          file=sys.stderr)
    kw = {k: v for k, v in _generation(args).items() if k != "num_beams"}
    for line in sys.stdin:
        prompt = line.strip()
        if not prompt:
            break
        for piece in pali.stream(image, prompt, **kw):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0


def run_info(args) -> int:
    path = Path(args.model_dir) if args.model_dir else default_model_dir()
    config = PaliGemmaConfig.from_pretrained(path)
    files = checkpoint_files(path)
    with torch.device("meta"):
        n = sum(p.numel() for p in PaliGemma(config).parameters())
    from safetensors import safe_open
    dtypes = set()
    for f in files:
        with safe_open(str(f), "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    t, v = config.text_config, config.vision_config
    info = {"model_dir": str(path), "generation": 2 if config.is_gemma2 else 1, "parameters": n,
            "dtypes": sorted(dtypes), "size_bytes": sum(f.stat().st_size for f in files), "files": len(files),
            "image_size": v.image_size, "image_tokens": config.num_image_tokens, "vocab_rows": t.vocab_size,
            "decoder": f"{t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads "
                       f"({t.num_key_value_heads} kv) of {t.head_dim}",
            "vision": f"{v.num_hidden_layers} layers, width {v.hidden_size}, patch {v.patch_size}"}
    if args.json:
        print(json.dumps(info))
    else:
        for k, val in info.items():
            print(f"{k:14s} {val:,}" if isinstance(val, int) else f"{k:14s} {val}")
    return 0


def run_train(args) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if not args.config and "model" not in given:
        raise ValueError("train needs --model (the checkpoint to start from) or a --config file that names it")
    config = TrainConfig.from_file(args.config, **given) if args.config else TrainConfig(**given)
    final = fit(config)
    print(f"final checkpoint: {final}")
    return 0


COMMANDS = {"caption": run_text, "answer": run_text, "ocr": run_text, "generate": run_text, "detect": run_objects,
            "segment": run_objects, "chat": run_chat, "info": run_info, "train": run_train}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(f"nanopali: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
