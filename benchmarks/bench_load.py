"""Benchmark loading a big_vision release .npz into bfloat16: peak RSS against the bf16 model's size, and load time.

    python scripts/make_random_checkpoint.py --name paligemma-3b-224 --layout big_vision --out /tmp/pg3b.npz
    python benchmarks/bench_load.py --npz /tmp/pg3b.npz --config paligemma-3b-224          # the #24 target
    python benchmarks/bench_load.py --quick     # writes and loads a 2+2-layer model of the 3B's widths, ~1 min

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
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.npz, args.config, args.dtype)
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
