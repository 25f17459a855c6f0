"""Decode speed of nanopali against llama.cpp, paired: both in one process, blocks of steps alternating.

    python benchmarks/bench_paired.py --model /tmp/pg3b                    # bf16, int8, int4 against bf16, q8_0, q4_0
    python benchmarks/bench_paired.py --model /tmp/pg3b --precisions int4 --blocks 20

bench_generate.py times each framework in its own process, one after the other; on a shared host whose memory
bandwidth moves by ±15 % from one minute to the next (BENCHMARKS.md), two frameworks a few minutes apart are timed
on different machines, and one round's ratio can be off by 20 %. Here the two are loaded side by side (needs the
memory of both: 11 GB for the 3B in bf16) and timed in alternating blocks of --steps greedy decode steps, a pause
between blocks so neither's idle threads are still spinning; each block's ratio compares two stretches seconds
apart. Both decode the same text prompt (bench_generate.text_ids: the image prompt's length in random text ids,
llama.cpp has no image tower) after one prefill. A nanopali step is timed on the wall clock with its argmax, as
`generate` runs it; a llama.cpp step by llama.cpp's own counter (llama_perf_context, as bench_generate.py times
it), which leaves out the Python binding and the argmax: a C++ user's step. nanopali runs as `nanopali.load` prepares it (its one-row path measured in its first steps,
which come before the timed blocks); llama.cpp on the GGUF bench_generate.py converts (benchmarks/llamacpp.py).
Prints each block and the median ratio with its spread; the ratio is llama.cpp's step time over nanopali's (> 1:
nanopali faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
import peaks  # noqa: E402
from bench_generate import text_ids  # noqa: E402

RIVALS = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
PAUSE_S = 0.2  # between blocks: OpenMP's and ggml's worker threads spin a while after their last work


def block(step, steps: int, clock=time.perf_counter) -> float:
    """The median time of `steps` calls of step(), read on `clock` (seconds)."""
    times = []
    for _ in range(steps):
        start = clock()
        step()
        times.append(clock() - start)
    return statistics.median(times)


@torch.no_grad()
def compare(model_dir: Path, precision: str, blocks: int, steps: int, threads: int) -> list[tuple[float, float, float]]:
    """(nanopali, llama.cpp) median step seconds of each pair of blocks, and the read bandwidth (GB/s) measured
    right after the pair (peaks.read_bandwidth)."""
    from nanopali import PaliGemma, PaliGemmaConfig, prepare
    from nanopali.inference.decode import prefill
    from nanopali.inference.quantize import load_quantized
    torch.set_num_threads(threads)
    kind = RIVALS[precision]
    gguf = llamacpp.ensure_gguf(model_dir, [kind], threads)[kind]
    ids = text_ids(PaliGemmaConfig.from_pretrained(model_dir))
    room = 2 * (blocks + 2) * steps + 32
    if precision == "bf16":
        model = PaliGemma.from_pretrained(model_dir, dtype=torch.bfloat16)
        runtime = prepare(model)
    else:
        model = load_quantized(model_dir, precision)
        runtime = prepare(model, quantize=precision)
    rival = llamacpp.LlamaCpp(gguf, threads, ids.shape[1] + room)
    logits, state = prefill(model, ids, max_new_tokens=room, runtime=runtime)
    ours = [logits.argmax(-1)]
    theirs = [rival.prefill(ids[0].tolist())]

    def our_step():
        ours[0] = state.step(model, ours[0]).argmax(-1)

    def their_step():
        theirs[0] = rival.step(theirs[0])

    block(our_step, 2 * steps)   # nanopali's path choice (its first 12 steps) and llama.cpp's first steps: untimed
    block(their_step, steps)
    pairs = []
    for b in range(blocks):
        time.sleep(PAUSE_S)
        mine = block(our_step, steps)
        time.sleep(PAUSE_S)
        other = block(their_step, steps, clock=lambda: rival.perf()[1] / 1000)  # llama.cpp's own decode time
        pairs.append((mine, other, peaks.read_bandwidth(threads)))
        print(f"  {precision} block {b}: nanopali {1000 * mine:7.1f} ms, llama.cpp-{kind} {1000 * other:7.1f} ms, "
              f"ratio {other / mine:.3f}; memory read {pairs[-1][2]:.1f} GB/s", flush=True)
    print(f"  {precision}: one-row path {runtime.kernels.chooser.choice or runtime.kernels.forced}", flush=True)
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a PaliGemma checkpoint directory")
    p.add_argument("--precisions", nargs="+", default=list(RIVALS), choices=list(RIVALS))
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps", type=int, default=8, help="decode steps a block")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rows = []
    for precision in args.precisions:
        pairs = compare(args.model, precision, args.blocks, args.steps, args.threads)
        ratios = sorted(other / mine for mine, other, _ in pairs)
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        ours_gb, theirs_gb = decode_bytes(args.model, precision)
        # % of the bound: bytes a step reads / the step's time, over the bandwidth measured right after the pair
        ours_pct = statistics.median(100 * ours_gb / m / bw for m, _, bw in pairs)
        theirs_pct = statistics.median(100 * theirs_gb / o / bw for _, o, bw in pairs)
        mine, other = statistics.median(m for m, _, _ in pairs), statistics.median(o for _, o, _ in pairs)
        rows.append(f"{precision:5s} vs {RIVALS[precision]:5s}  nanopali {1 / mine:6.2f} tok/s ({ours_pct:3.0f}% of its "
                    f"bound, {ours_gb:.2f} GB/token), llama.cpp {1 / other:6.2f} tok/s ({theirs_pct:3.0f}%, "
                    f"{theirs_gb:.2f} GB/token); ratio median {statistics.median(ratios):.3f} (quartiles "
                    f"{q1:.3f}-{q3:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}, {len(ratios)} blocks of {args.steps} steps)")
    print(f"\npaired decode, {args.threads} threads, the ratio = llama.cpp's step time / nanopali's; memory read per "
          "block pair (peaks.read_bandwidth, best of 5 reads of 1 GiB):")
    print("\n".join(rows))


def decode_bytes(model_dir: Path, precision: str) -> tuple[float, float]:
    """GB one decode step reads: nanopali's (bench_generate.model_costs, as its bound) and the GGUF's weights."""
    from bench_generate import model_costs
    return (model_costs(str(model_dir), "bfloat16")["decode_bytes"][precision] / 1e9,
            llamacpp.weight_bytes(llamacpp.gguf_path(model_dir, RIVALS[precision])) / 1e9)


if __name__ == "__main__":
    main()
