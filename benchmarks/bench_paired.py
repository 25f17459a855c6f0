"""Decode speed of nanopali against llama.cpp, paired: blocks of steps alternating between two live processes.

    python benchmarks/bench_paired.py --model /tmp/pg3b                    # bf16, int8, int4 against bf16, q8_0, q4_0
    python benchmarks/bench_paired.py --model /tmp/pg3b --precisions int4 --blocks 20
    python benchmarks/bench_paired.py --model /tmp/pg3b --same-process    # both in this process instead

bench_generate.py times each framework in its own process, one after the other; on a shared host whose memory
bandwidth moves by ±15-30 % from one minute to the next (BENCHMARKS.md), two frameworks a few minutes apart are
timed on different machines, and one round's ratio can be off by 20 %. Here both are loaded at once (needs the
memory of both: 11 GB for the 3B in bf16), each in its own worker process (this script with --worker), and the
driver has them decode alternating blocks of --steps greedy steps, one at a time, a pause before each block so the
other's idle threads have stopped spinning, and which of the two goes first alternating from pair to pair; each
pair's ratio compares two stretches seconds apart. After each pair the driver probes the read bandwidth
(peaks.read_bandwidth), so each framework's share of its bound is measured at the same time too. --same-process
loads both into the driver instead (the first version of this script; BENCHMARKS.md compares the two).

Both decode the same text prompt (bench_generate.text_ids: the image prompt's length in random text ids, llama.cpp
has no image tower) after one prefill. A nanopali step is timed on the wall clock with its argmax, as `generate`
runs it; a llama.cpp step by llama.cpp's own counter (llama_perf_context, as bench_generate.py times it), which
leaves out the Python binding and the argmax: a C++ user's step. nanopali runs as `nanopali.load` prepares it (its
one-row path measured in its first steps, which come before the timed blocks); llama.cpp on the GGUF
bench_generate.py converts (benchmarks/llamacpp.py). The ratio printed is llama.cpp's step time over nanopali's
(> 1: nanopali faster).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
import peaks  # noqa: E402
from bench_generate import model_costs, text_ids  # noqa: E402

RIVALS = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
PAUSE_S = 0.2  # before each block: OpenMP's and ggml's worker threads spin a while after their last work


def block(step, steps: int, clock=time.perf_counter) -> float:
    """The median time of `steps` calls of step(), read on `clock` (seconds)."""
    times = []
    for _ in range(steps):
        start = clock()
        step()
        times.append(clock() - start)
    return statistics.median(times)


@torch.no_grad()
def decoder(who: str, model_dir: Path, precision: str, room: int, threads: int):
    """A function timing one block of decode steps of `who` ("nanopali" or "llamacpp"), after its prefill and its
    untimed first steps (nanopali's path choice takes its first 12)."""
    from nanopali import PaliGemma, PaliGemmaConfig, prepare
    from nanopali.inference.decode import prefill
    from nanopali.inference.quantize import load_quantized
    torch.set_num_threads(threads)
    ids = text_ids(PaliGemmaConfig.from_pretrained(model_dir))
    if who == "llamacpp":
        kind = RIVALS[precision]
        rival = llamacpp.LlamaCpp(llamacpp.ensure_gguf(model_dir, [kind], threads)[kind], threads, ids.shape[1] + room)
        token = [rival.prefill(ids[0].tolist())]

        def step():
            token[0] = rival.step(token[0])
        block(step, 8)
        return lambda steps: block(step, steps, clock=lambda: rival.perf()[1] / 1000)  # llama.cpp's own time
    if precision == "bf16":
        model = PaliGemma.from_pretrained(model_dir, dtype=torch.bfloat16)
        runtime = prepare(model)
    else:
        model = load_quantized(model_dir, precision)
        runtime = prepare(model, quantize=precision)
    logits, state = prefill(model, ids, max_new_tokens=room, runtime=runtime)
    token = [logits.argmax(-1)]

    def step():
        with torch.no_grad():
            token[0] = state.step(model, token[0]).argmax(-1)
    block(step, 16)
    return lambda steps: block(step, steps)


def worker(args) -> None:
    """--worker: load, prefill, then time one block per "go" line on stdin, answering with its median step seconds."""
    run = decoder(args.worker, args.model, args.precisions[0], args.room, args.threads)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        print(f"{run(args.steps):.6f}", flush=True)


class Worker:
    """One framework's worker process."""

    def __init__(self, who: str, args, precision: str, room: int):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", who, "--model", str(args.model), "--precisions", precision,
             "--steps", str(args.steps), "--threads", str(args.threads), "--room", str(room)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the {who} worker failed to start (its error is above)")

    def block(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare(args, precision: str) -> list[tuple[float, float, float]]:
    """(nanopali, llama.cpp) median step seconds of each pair of blocks, and the read bandwidth (GB/s) measured
    right after the pair."""
    room = 2 * (args.blocks + 2) * args.steps + 32
    if args.same_process:
        runs = {who: decoder(who, args.model, precision, room, args.threads) for who in ("nanopali", "llamacpp")}
        close = []
    else:
        workers = {who: Worker(who, args, precision, room) for who in ("nanopali", "llamacpp")}
        runs = {who: (lambda steps, w=w: w.block()) for who, w in workers.items()}
        close = list(workers.values())
    pairs = []
    for b in range(args.blocks):  # who goes first alternates: neither always follows the other
        times = {}
        for who in (("nanopali", "llamacpp") if b % 2 == 0 else ("llamacpp", "nanopali")):
            time.sleep(PAUSE_S)
            times[who] = runs[who](args.steps)
        pairs.append((times["nanopali"], times["llamacpp"], peaks.read_bandwidth(args.threads)))
        print(f"  {precision} block {b}: nanopali {1000 * pairs[-1][0]:7.1f} ms, llama.cpp-{RIVALS[precision]} "
              f"{1000 * pairs[-1][1]:7.1f} ms, ratio {pairs[-1][1] / pairs[-1][0]:.3f}; memory read {pairs[-1][2]:.1f} GB/s",
              flush=True)
    for w in close:
        w.close()
    return pairs


def decode_bytes(model_dir: Path, precision: str) -> tuple[float, float]:
    """GB one decode step reads: nanopali's (bench_generate.model_costs, as its bound) and the GGUF's weights."""
    return (model_costs(model_dir, "bfloat16")["decode_bytes"][precision] / 1e9,
            llamacpp.weight_bytes(llamacpp.gguf_path(model_dir, RIVALS[precision])) / 1e9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a PaliGemma checkpoint directory")
    p.add_argument("--precisions", nargs="+", default=list(RIVALS), choices=list(RIVALS))
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps", type=int, default=8, help="decode steps a block")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--same-process", action="store_true", help="load both frameworks into this process")
    p.add_argument("--worker", choices=["nanopali", "llamacpp"], help=argparse.SUPPRESS)
    p.add_argument("--room", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    llamacpp.ensure_gguf(args.model, [RIVALS[x] for x in args.precisions], args.threads)  # before any worker
    rows = []
    for precision in args.precisions:
        pairs = compare(args, precision)
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
    where = "one process" if args.same_process else "a process each"
    print(f"\npaired decode ({where}), {args.threads} threads, the ratio = llama.cpp's step time / nanopali's; memory "
          "read per block pair (peaks.read_bandwidth, best of 5 reads of 1 GiB):")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
