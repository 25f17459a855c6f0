"""Write a random-weight PaliGemma checkpoint of a published size (or any config.json), offline.

    python scripts/make_random_checkpoint.py --name paligemma-3b-224 --dtype bfloat16 --out checkpoints/pg-3b-224-random

No PaliGemma weights can be downloaded here, so benchmarks and large-model checks run on random
weights of the real architecture. The model is built on the meta device and each tensor is drawn
directly in the target dtype, so the full-size 3B bf16 checkpoint (5.85 GB) never needs an fp32
copy. Written in the Hugging Face layout (sharded safetensors) that nanopali and transformers load.
No tokenizer is written. `--device cuda` draws the numbers on a GPU: seconds for the 3B, where two CPU
cores take most of the ~45 s (other numbers than the CPU's for the same seed); writing is the rest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nanopali import PaliGemma, PaliGemmaConfig
from nanopali.io.hf_checkpoint import save_state_dict
from nanopali.registry import NAMES, named_config


def random_state(config: PaliGemmaConfig, dtype: torch.dtype, seed: int = 0, std: float = 0.02,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the model in `dtype` on the CPU, drawn on `device`."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PaliGemma(config).state_dict().items()}
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if "layer_norm" in name or "layernorm" in name:  # SigLIP LayerNorm: weight 1, bias 0
            t.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("norm.weight"):              # Gemma RMSNorm stores w of (1 + w)
            t.zero_()
        else:
            t.normal_(0.0, std, generator=g)
        state[name] = t.cpu()
    return state


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--name", choices=NAMES, help="a published size")
    src.add_argument("--config", type=Path, help="a config.json (or checkpoint directory) to copy the shapes from")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda: much faster)")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    config = named_config(args.name) if args.name else PaliGemmaConfig.from_pretrained(args.config)
    start = time.time()
    state = random_state(config, getattr(torch, args.dtype), args.seed, device=args.device)
    config.save_pretrained(args.out)
    files = save_state_dict(state, args.out, args.max_shard_size)
    size = sum(f.stat().st_size for f in files) / 1e9
    print(f"wrote {len(files)} file(s), {size:.2f} GB, to {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
