"""Benchmark generation: prefill latency, decode tokens/s and peak memory of nanopali vs transformers.

    python benchmarks/bench_generate.py --model /tmp/pg3b --new-tokens 16 --runs 3
    python benchmarks/bench_generate.py --model /tmp/pg-tiny --new-tokens 4 --runs 1   # smoke check, seconds

Both frameworks load the same checkpoint directory (any size: image tokens and image size come from
its config.json) and get the same inputs: B rows of <image> x N, <bos>, 10 random text ids, "\\n",
random pixels in [-1, 1], all drawn from a fixed seed. Each framework runs in its own subprocess
(this script re-invokes itself with --worker), so peak RSS (ru_maxrss) is per framework and covers
loading and generating. What is timed, identically on both sides, greedy:

    prefill   one forward over the prompt that fills the KV cache and returns the last token's logits
    decode    N single-token cached forwards + argmax, after the prefill; tokens/s = B * N / their time
    generate  the public generate() call for N new tokens, end to end (prefill + N-1 steps + its loop)

Run 0 of each is a warm-up and is dropped; the table shows medians (and bests) over the other runs,
and how much of the CPUs other processes took meanwhile (from /proc/stat): on a shared machine a
busy neighbour slows a run several-fold, so rerun when that row is not near 0.
transformers uses its default attention (reported in the table) and its default DynamicCache;
nanopali uses its static cache. The ratio column is nanopali / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 10  # random text ids between <bos> and "\n"
NEWLINE = 108       # "\n" in the Gemma tokenizer
FRAMEWORKS = ("nanopali", "transformers")


# ---------------------------------------------------------------- worker: one framework per process

def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def make_inputs(config, batch: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same prompt for both frameworks: long (B, T) ids/masks and (B, 3, S, S) pixels."""
    g = torch.Generator().manual_seed(seed)
    high = min(256000, config.image_token_index, config.text_config.vocab_size)
    ids = torch.cat([
        torch.full((batch, config.num_image_tokens), config.image_token_index),
        torch.full((batch, 1), config.text_config.bos_token_id),
        torch.randint(3, high, (batch, PROMPT_TOKENS), generator=g),
        torch.full((batch, 1), NEWLINE),
    ], 1)
    size = config.vision_config.image_size
    pixels = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    return dict(input_ids=ids, pixel_values=pixels.to(dtype), attention_mask=torch.ones_like(ids),
                token_type_ids=torch.zeros_like(ids))


class NanoPali:
    def __init__(self, path: str, dtype: torch.dtype):
        from nanopali import PaliGemma
        self.model = PaliGemma.from_pretrained(path, dtype=dtype)
        self.attention = "torch SDPA (explicit softmax where Gemma 2 soft-caps)"

    def prefill(self, inputs, new_tokens: int):
        from nanopali.decode import prefill
        logits, state = prefill(self.model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                inputs["token_type_ids"], max_new_tokens=new_tokens)
        return logits, state

    def step(self, state, tokens):
        return state, state.step(self.model, tokens)

    def generate(self, inputs, new_tokens: int) -> torch.Tensor:
        return self.model.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=[])


class Transformers:
    def __init__(self, path: str, dtype: torch.dtype):
        from transformers import PaliGemmaForConditionalGeneration
        self.model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        self.model.generation_config.eos_token_id = None  # never stop early, like eos_token_id=[] in nanopali
        self.attention = self.model.config._attn_implementation

    def prefill(self, inputs, new_tokens: int):
        mask = inputs["attention_mask"]
        out = self.model(**inputs, position_ids=mask.cumsum(-1), use_cache=True, logits_to_keep=1)  # 1-based positions
        return out.logits[:, -1].float(), (out.past_key_values, mask)

    def step(self, state, tokens):
        cache, mask = state
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True),
                         past_key_values=cache, use_cache=True)
        return (out.past_key_values, mask), out.logits[:, -1].float()

    def generate(self, inputs, new_tokens: int) -> torch.Tensor:
        out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return out[:, inputs["input_ids"].shape[1]:]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by all processes on the machine since boot, by this process): Linux /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def other_load(before, after, wall_s: float) -> float:
    """Share of all cores that other processes used between two cpu_seconds() readings: 0 = quiet machine."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / (wall_s * os.cpu_count()))


@torch.no_grad()
def worker(args) -> dict:
    from nanopali import PaliGemmaConfig
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(PaliGemmaConfig.from_pretrained(args.model), args.batch, dtype)
    fw, load_s = timed({"nanopali": NanoPali, "transformers": Transformers}[args.worker], args.model, dtype)
    rss_after_load = peak_rss_gib()
    n, prefill_s, decode_s, generate_s, busy = args.new_tokens, [], [], [], []
    for run in range(args.runs + 1):
        cpu_start, wall_start = cpu_seconds(), time.perf_counter()
        (logits, state), t = timed(fw.prefill, inputs, n)
        prefill_s.append(t)
        tokens = [logits.argmax(-1)]
        start = time.perf_counter()
        for _ in range(n):
            state, logits = fw.step(state, tokens[-1])
            tokens.append(logits.argmax(-1))
        decode_s.append(time.perf_counter() - start)
        generated, t = timed(fw.generate, inputs, n)
        generate_s.append(t)
        if generated.shape[1] != n:
            raise RuntimeError(f"{args.worker} generate() returned {generated.shape[1]} tokens, expected {n}")
        busy.append(other_load(cpu_start, cpu_seconds(), time.perf_counter() - wall_start))
        print(f"[{args.worker}] run {run}{' (warm-up)' if run == 0 else ''}: prefill {prefill_s[-1]:.2f} s, "
              f"decode {n} steps {decode_s[-1]:.2f} s, generate {generate_s[-1]:.2f} s, "
              f"other processes {100 * busy[-1]:.0f}% of the CPUs", file=sys.stderr, flush=True)
    timed_runs = slice(1, None)  # drop the warm-up
    return dict(
        framework=args.worker, attention=fw.attention, threads=torch.get_num_threads(), load_s=load_s,
        prefill_ms=1000 * statistics.median(prefill_s[timed_runs]), prefill_best_ms=1000 * min(prefill_s[timed_runs]),
        decode_tok_s=args.batch * n / statistics.median(decode_s[timed_runs]),
        decode_best_tok_s=args.batch * n / min(decode_s[timed_runs]),
        generate_s=statistics.median(generate_s[timed_runs]), other_load_pct=100 * max(busy[timed_runs]),
        rss_after_load_gib=rss_after_load, peak_rss_gib=peak_rss_gib(),
        tokens=torch.stack(tokens, 1)[0].tolist(),
    )


# ---------------------------------------------------------------- driver: run the workers, print the table

def run_worker(framework: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--model", str(args.model), "--new-tokens", str(args.new_tokens),
           "--runs", str(args.runs), "--threads", str(args.threads), "--batch", str(args.batch), "--dtype", args.dtype]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress and warnings go to stderr
    if proc.returncode != 0:
        raise SystemExit(f"the {framework} worker failed (exit {proc.returncode}); its errors are printed above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], weight_gib: float, args) -> str:
    rows = [  # (label, key, format)
        ("load (s)", "load_s", "{:.1f}"),
        ("prefill latency (ms), median", "prefill_ms", "{:.0f}"),
        ("prefill latency (ms), best", "prefill_best_ms", "{:.0f}"),
        (f"decode tokens/s (batch {args.batch}), median", "decode_tok_s", "{:.2f}"),
        (f"decode tokens/s (batch {args.batch}), best", "decode_best_tok_s", "{:.2f}"),
        (f"generate {args.new_tokens} tokens (s)", "generate_s", "{:.2f}"),
        ("peak RSS after load (GiB)", "rss_after_load_gib", "{:.2f}"),
        ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"),
        ("peak RSS / weight bytes", "rss_per_weight", "{:.2f}"),
        ("other processes' CPU share, max (%)", "other_load_pct", "{:.0f}"),
    ]
    for r in results.values():
        r["rss_per_weight"] = r["peak_rss_gib"] / weight_gib
    names = list(results)
    lines = [f"{'':34}" + "".join(f"{n:>14}" for n in names) + (f"{'ratio':>10}" if len(names) == 2 else "")]
    for label, key, fmt in rows:
        cells = [fmt.format(results[n][key]) for n in names]
        a, b = (results[n][key] for n in names[:2]) if len(names) == 2 else (0, 0)
        ratio = f"{a / b:>10.2f}" if b and key != "other_load_pct" else ""
        lines.append(f"{label:34}" + "".join(f"{c:>14}" for c in cells) + ratio)
    lines.append(f"weights: {weight_gib:.2f} GiB on disk; threads: {results[names[0]]['threads']}; dtype: {args.dtype}")
    lines += [f"{n} attention: {results[n]['attention']}" for n in names]
    if len(names) == 2:
        a, b = (results[n]["tokens"] for n in names)
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        lines.append(f"greedy tokens agree for the first {agree} of {len(a)} (row 0)")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps to time (and generate() length)")
    p.add_argument("--runs", type=int, default=3, help="timed runs, after one warm-up run")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of nanopali,transformers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new_tokens < 1 or args.runs < 1 or args.batch < 1 or args.threads < 1:
        p.error("--new-tokens, --runs, --batch and --threads must be >= 1")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown or not frameworks:
        p.error(f"--frameworks takes a comma-separated subset of {','.join(FRAMEWORKS)}, got {args.frameworks!r}")
    from nanopali.weights import CheckpointError, checkpoint_files
    try:
        weight_gib = sum(f.stat().st_size for f in checkpoint_files(Path(args.model))) / 2**30
    except CheckpointError as e:
        p.error(str(e))
    results = {f: run_worker(f, args) for f in frameworks}
    print(report(results, weight_gib, args))
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, weight_gib=weight_gib,
                                             results=results), indent=2))


if __name__ == "__main__":
    main()
