"""Benchmark loading: peak RSS against the loaded model's bytes, and load time. Two cases:

    python scripts/make_random_checkpoint.py --name paligemma-3b-224 --layout big_vision --out /tmp/pg3b.npz
    python benchmarks/bench_load.py --npz /tmp/pg3b.npz --config paligemma-3b-224          # the #24 target
    python benchmarks/bench_load.py --quick     # writes and loads a 2+2-layer model of the 3B's widths, ~1 min

    python benchmarks/bench_load.py --model checkpoints/pg-3b-224-random --quantize int8 int4   # the #25 target

--model DIR --quantize MODE...: a checkpoint directory loaded with its decoder quantized, each mode two ways in
separate subprocesses: `load_quantized` (quantized tensor by tensor as it is read: what nanopali.load, the CLI's
--quantize and the benchmarks use) and `after` (PaliGemma.from_pretrained, then quantize: the path before #25).
The bytes are those of the loaded model's parameters and buffers (int8/int4 weights, scales, the float rest);
the target of issue #25 is peak RSS <= 1.15 x those bytes + the baseline.

The load runs in a subprocess of its own (this script re-invoked with --worker), so its peak RSS
(ru_maxrss, which Linux keeps per process) covers only `PaliGemma.from_big_vision`, plus the imports that
come before it; the baseline, measured in the same subprocess just before loading, is the RSS of
`import torch, nanopali` alone. The target of issue #24 is peak RSS <= 1.15 x the bf16 model's bytes (sum of
numel x 2 over the loaded parameters). The file is read once beforehand unless --cold, so the time is the
conversion's, not the disk's; --cold drops nothing (no root needed) and only reports the first read.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_gib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def worker(npz: str, config: str, dtype: str) -> None:
    import torch

    from nanopali import PaliGemma

    baseline = rss_gib()
    start = time.perf_counter()
    model = PaliGemma.from_big_vision(npz, config, dtype=dtype)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(json.dumps(dict(seconds=seconds, baseline_gib=baseline, peak_gib=peak, hwm_gib=rss_gib("VmHWM"),
                          weights_gib=weights / 2**30, dtype=str(next(model.parameters()).dtype),
                          threads=torch.get_num_threads())))


def quantized_worker(model_dir: str, mode: str, how: str, dtype: str) -> None:
    import torch

    from nanopali import PaliGemma
    from nanopali.inference.quantize import load_quantized, quantize

    baseline = rss_gib()
    start = time.perf_counter()
    if how == "load_quantized":
        model = load_quantized(model_dir, mode, dtype=dtype)
    else:
        model = quantize(PaliGemma.from_pretrained(model_dir, dtype=dtype), mode)
    seconds = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                  if t.device.type != "meta")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(dict(seconds=seconds, baseline_gib=baseline, peak_gib=peak, rss_end_gib=rss_gib(),
                          weights_gib=weights / 2**30, threads=torch.get_num_threads())))


def quantized_loads(model_dir: str, modes: list[str], dtype: str, cold: bool) -> None:
    from nanopali.io.hf_checkpoint import checkpoint_files
    files = checkpoint_files(Path(model_dir))
    size = sum(f.stat().st_size for f in files) / 2**30
    if not cold:  # in the page cache, so the time is the conversion's
        for file in files:
            with open(file, "rb") as f:
                while f.read(64 << 20):
                    pass
    print(f"checkpoint {model_dir} ({size:.2f} GiB of safetensors), loaded in {dtype}")
    print(f"{'mode':6} {'how':15} {'seconds':>8} {'baseline':>9} {'model':>7} {'peak RSS':>9} {'RSS after':>9} "
          f"{'peak / model':>13} {'(peak - baseline) / model':>26}   (GiB)")
    for mode in modes:
        for how in ("load_quantized", "after"):
            run = subprocess.run([sys.executable, __file__, "--worker", "--model", model_dir, "--quantize", mode,
                                  "--how", how, "--dtype", dtype], capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{mode:6} {how:15} {r['seconds']:8.1f} {r['baseline_gib']:9.2f} {r['weights_gib']:7.2f} "
                  f"{r['peak_gib']:9.2f} {r['rss_end_gib']:9.2f} {r['peak_gib'] / r['weights_gib']:13.2f} "
                  f"{(r['peak_gib'] - r['baseline_gib']) / r['weights_gib']:26.2f}", flush=True)


def quick_npz(folder: Path) -> tuple[Path, Path]:
    """A 2-layer (vision and text) model of paligemma-3b-224's widths, float32, in the release layout."""
    from dataclasses import replace

    from nanopali.registry import named_config

    config = named_config("paligemma-3b-224")
    config = replace(config, vision_config=replace(config.vision_config, num_hidden_layers=2),
                     text_config=replace(config.text_config, num_hidden_layers=2, layer_types=[]))
    config.save_pretrained(folder)
    npz = folder / "quick.npz"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_checkpoint.py"), "--config", str(folder),
                    "--layout", "big_vision", "--out", str(npz)], check=True)
    return npz, folder / "config.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz")
    p.add_argument("--config", help="a published size or a config.json")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cold", action="store_true", help="do not read the file once before timing")
    p.add_argument("--model", help="a checkpoint directory, loaded with --quantize")
    p.add_argument("--quantize", nargs="+", choices=["int8", "int4"], help="with --model: the modes to load")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--how", choices=["load_quantized", "after"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker and args.model:
        return quantized_worker(args.model, args.quantize[0], args.how, args.dtype)
    if args.worker:
        return worker(args.npz, args.config, args.dtype)
    if args.model or args.quantize:
        if not (args.model and args.quantize):
            p.error("--model and --quantize go together")
        return quantized_loads(args.model, args.quantize, args.dtype, args.cold)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.npz, args.config = quick_npz(Path(tmp))
        elif not (args.npz and args.config):
            p.error("--npz and --config (or --quick)")
        npz = Path(args.npz)
        with zipfile.ZipFile(npz) as z:
            kinds = {"stored" if i.compress_type == zipfile.ZIP_STORED else "deflated" for i in z.infolist()}
        if not args.cold:
            with open(npz, "rb") as f:
                while f.read(64 << 20):
                    pass
        run = subprocess.run([sys.executable, __file__, "--worker", "--npz", str(npz), "--config", str(args.config),
                              "--dtype", args.dtype], capture_output=True, text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        size = npz.stat().st_size / 2**30
    print(f"file            {npz} ({size:.2f} GiB, {'+'.join(sorted(kinds))}), config {args.config}")
    print(f"loaded weights  {r['weights_gib']:.3f} GiB in {r['dtype']} ({r['threads']} threads)")
    print(f"load time       {r['seconds']:.1f} s ({size / r['seconds']:.2f} GiB/s of file{'' if args.cold else ', file in the page cache'})")
    print(f"RSS after imports (baseline) {r['baseline_gib']:.3f} GiB; peak RSS {r['peak_gib']:.3f} GiB (VmHWM {r['hwm_gib']:.3f})")
    print(f"peak RSS / weights {r['peak_gib'] / r['weights_gib']:.3f} (target <= 1.15); "
          f"(peak - baseline) / weights {(r['peak_gib'] - r['baseline_gib']) / r['weights_gib']:.3f}")


if __name__ == "__main__":
    main()
