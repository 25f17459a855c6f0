"""Benchmark one full fine-tuning step: examples/s, tokens/s and peak memory of nanopali vs transformers.

    python benchmarks/bench_train.py --model /tmp/pg-quarter --batch 4 --steps 3
    python benchmarks/bench_train.py --model /tmp/pg-tiny --batch 2 --steps 1     # smoke check, seconds

Both frameworks load the same checkpoint directory in float32 and train on the same batch, drawn
from a fixed seed (no tokenizer needed): B rows of <image> x N, <bos>, 10 random prompt ids, "\\n",
16 random suffix ids, <eos>, with random pixels in [-1, 1]; token_type_ids mark the suffix and
labels are -100 on the prefix, as the Processor makes them. One step, timed identically on both sides:

    loss = model(**inputs, labels=labels).loss    (inside torch.autocast(bf16) for the bf16 variant)
    loss.backward(); opt.step(); opt.zero_grad()  (torch.optim.AdamW over every parameter, full fine-tuning)

transformers computes logits for every position (B, T, V) and then the loss; nanopali sends only
the suffix positions through the output head (nn/losses.py). Each (framework, precision) pair runs in
its own subprocess (this script re-invokes itself with --worker), so peak RSS (ru_maxrss) is per
pair and covers loading and training. Step 0 is a warm-up and is dropped; the table shows medians
(and the best step), the loss of the first step on both sides (same weights and batch: they should
agree) and how much of the CPUs other processes took meanwhile (from /proc/stat), since a busy
neighbour slows a run several-fold. The ratio column is nanopali / transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_generate import cpu_seconds, other_load, peak_rss_gib  # same measurements as the generation benchmark

PROMPT_TOKENS, SUFFIX_TOKENS = 10, 16
NEWLINE = 108  # "\n" in the Gemma tokenizer
FRAMEWORKS = ("nanopali", "transformers")
PRECISIONS = ("fp32", "bf16-autocast")


# ---------------------------------------------------------------- worker: one framework and precision per process

def make_batch(config, batch: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs (long (B, T) ids / masks, float (B, 3, S, S) pixels) and labels long (B, T), -100 on the prefix."""
    g = torch.Generator().manual_seed(seed)
    text = config.text_config
    high = min(256000, config.image_token_index, text.vocab_size)
    prefix = torch.cat([
        torch.full((batch, config.num_image_tokens), config.image_token_index),
        torch.full((batch, 1), text.bos_token_id),
        torch.randint(3, high, (batch, PROMPT_TOKENS), generator=g),
        torch.full((batch, 1), NEWLINE),
    ], 1)
    suffix = torch.cat([torch.randint(3, high, (batch, SUFFIX_TOKENS), generator=g),
                        torch.full((batch, 1), text.eos_token_id)], 1)
    ids = torch.cat([prefix, suffix], 1)
    token_type_ids = torch.cat([torch.zeros_like(prefix), torch.ones_like(suffix)], 1)
    size = config.vision_config.image_size
    inputs = dict(input_ids=ids, pixel_values=torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
                  attention_mask=torch.ones_like(ids), token_type_ids=token_type_ids)
    return inputs, ids.masked_fill(token_type_ids == 0, -100)


def load_model(framework: str, path: str) -> tuple[torch.nn.Module, str]:
    """(the model in float32, train mode; a description of its attention)."""
    if framework == "nanopali":
        from nanopali import PaliGemma
        return PaliGemma.from_pretrained(path, dtype=torch.float32).train(), "torch SDPA (explicit softmax where Gemma 2 soft-caps)"
    from transformers import PaliGemmaForConditionalGeneration
    model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).train()
    return model, model.config._attn_implementation


def worker(args) -> dict:
    from nanopali import PaliGemmaConfig
    torch.set_num_threads(args.threads)
    inputs, labels = make_batch(PaliGemmaConfig.from_pretrained(args.model), args.batch)
    start = time.perf_counter()
    model, attention = load_model(args.worker, args.model)
    load_s, rss_after_load = time.perf_counter() - start, peak_rss_gib()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16-autocast" else contextlib.nullcontext()
    losses, forward_backward_s, optimizer_s, busy = [], [], [], []
    for step in range(args.steps + 1):
        cpu_start, start = cpu_seconds(), time.perf_counter()
        with autocast:
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        middle = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end = time.perf_counter()
        losses.append(loss.item())
        forward_backward_s.append(middle - start)
        optimizer_s.append(end - middle)
        busy.append(other_load(cpu_start, cpu_seconds(), end - start))
        print(f"[{args.worker} {args.precision}] step {step}{' (warm-up)' if step == 0 else ''}: loss {losses[-1]:.5f}, "
              f"forward+backward {forward_backward_s[-1]:.2f} s, optimizer {optimizer_s[-1]:.2f} s, "
              f"other processes {100 * busy[-1]:.0f}% of the CPUs", file=sys.stderr, flush=True)
    timed = slice(1, None)  # drop the warm-up
    steps = [a + b for a, b in zip(forward_backward_s, optimizer_s)][timed]
    tokens = int(inputs["attention_mask"].sum())
    return dict(
        framework=args.worker, precision=args.precision, attention=attention, threads=torch.get_num_threads(),
        load_s=load_s, step_s=statistics.median(steps), step_best_s=min(steps),
        examples_s=args.batch / statistics.median(steps), tokens_s=tokens / statistics.median(steps),
        forward_backward_s=statistics.median(forward_backward_s[timed]), optimizer_s=statistics.median(optimizer_s[timed]),
        rss_after_load_gib=rss_after_load, peak_rss_gib=peak_rss_gib(), other_load_pct=100 * max(busy[timed]),
        losses=losses, sequence_length=inputs["input_ids"].shape[1],
        parameters=sum(p.numel() for p in model.parameters()),
    )


# ---------------------------------------------------------------- driver: run the workers, print the tables

def run_worker(framework: str, precision: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--precision", precision, "--model", str(args.model),
           "--steps", str(args.steps), "--threads", str(args.threads), "--batch", str(args.batch)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress and warnings go to stderr
    if proc.returncode != 0:
        raise SystemExit(f"the {framework} {precision} worker failed (exit {proc.returncode}); its errors are printed above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], precision: str, args) -> str:
    rows = [  # (label, key, format)
        ("examples/s, median", "examples_s", "{:.3f}"),
        ("tokens/s, median", "tokens_s", "{:.1f}"),
        ("step (s), median", "step_s", "{:.2f}"),
        ("step (s), best", "step_best_s", "{:.2f}"),
        ("  forward + backward (s), median", "forward_backward_s", "{:.2f}"),
        ("  AdamW step (s), median", "optimizer_s", "{:.2f}"),
        ("load (s)", "load_s", "{:.1f}"),
        ("peak RSS after load (GiB)", "rss_after_load_gib", "{:.2f}"),
        ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"),
        ("loss of step 0", "loss0", "{:.5f}"),
        ("other processes' CPU share, max (%)", "other_load_pct", "{:.0f}"),
    ]
    for r in results.values():
        r["loss0"] = r["losses"][0]
    names = list(results)
    lines = [f"{precision}:", f"{'':36}" + "".join(f"{n:>14}" for n in names) + (f"{'ratio':>10}" if len(names) == 2 else "")]
    for label, key, fmt in rows:
        cells = [fmt.format(results[n][key]) for n in names]
        a, b = (results[n][key] for n in names[:2]) if len(names) == 2 else (0, 0)
        ratio = f"{a / b:>10.2f}" if b and key not in ("other_load_pct", "loss0") else ""
        lines.append(f"{label:36}" + "".join(f"{c:>14}" for c in cells) + ratio)
    first = results[names[0]]
    lines.append(f"batch {args.batch} x {first['sequence_length']} tokens ({SUFFIX_TOKENS + 1} labelled per row); "
                 f"{first['parameters'] / 1e6:.0f}M parameters; threads: {first['threads']}")
    lines += [f"{n} attention: {results[n]['attention']}" for n in names]
    if len(names) == 2:
        a, b = (results[n]["losses"] for n in names)
        lines.append("losses of every step (" + " / ".join(names) + "): "
                     + ", ".join(f"{x:.4f}/{y:.4f}" for x, y in zip(a, b)))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps, after one warm-up step")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of nanopali,transformers")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,bf16-autocast")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.threads < 1:
        p.error("--steps, --batch and --threads must be >= 1")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    chosen = {}
    for option, valid in (("frameworks", FRAMEWORKS), ("precisions", PRECISIONS)):
        chosen[option] = [x.strip() for x in getattr(args, option).split(",") if x.strip()]
        if not chosen[option] or set(chosen[option]) - set(valid):
            p.error(f"--{option} takes a comma-separated subset of {','.join(valid)}, got {getattr(args, option)!r}")
    if not Path(args.model, "config.json").is_file():
        p.error(f"no config.json in {args.model}")
    tables, everything = [], {}
    for precision in chosen["precisions"]:
        results = {f: run_worker(f, precision, args) for f in chosen["frameworks"]}
        everything[precision] = results
        tables.append(report(results, precision, args))
    print("\n\n".join(tables))
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, results=everything), indent=2))


if __name__ == "__main__":
    main()
