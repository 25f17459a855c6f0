"""Write a random-weight PaliGemma checkpoint of a published size (or any config.json), offline.

    python scripts/make_random_checkpoint.py --name paligemma-3b-224 --dtype bfloat16 --out checkpoints/pg-3b-224-random
    python scripts/make_random_checkpoint.py --name paligemma-3b-224 --layout big_vision --out /tmp/pg-3b-224.npz

No PaliGemma weights can be downloaded here, so benchmarks and large-model checks run on random
weights of the real architecture. The model is built on the meta device and each tensor is drawn
directly in the target dtype, so the full-size 3B bf16 checkpoint (5.85 GB) never needs an fp32
copy. Written in the Hugging Face layout (sharded safetensors) that nanopali and transformers load.
No tokenizer is written. `--device cuda` draws the numbers on a GPU: seconds for the 3B, where two CPU
cores take most of the ~45 s (other numbers than the CPU's for the same seed); writing is the rest.

`--layout big_vision` writes one .npz as Google's big_vision releases it (nanopali/io/big_vision.py): float32
(11.7 GB for the 3B) or, with `--dtype bfloat16`, raw bfloat16 `|V2` arrays (name it `.b16.npz`), the embedding
cut to the tokenizer's rows (the config's image_token_index: 257152 for the published sizes). Each tensor
is drawn when it is written, so memory stays at the largest one (the float32 embedding, 2.1 GB).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from nanopali import PaliGemma, PaliGemmaConfig
from nanopali.io.big_vision import save_npz
from nanopali.io.hf_checkpoint import save_state_dict
from nanopali.registry import NAMES, named_config


def parameter_shapes(config: PaliGemmaConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in PaliGemma(config).state_dict().items()}


def random_tensor(name: str, shape, dtype: torch.dtype, generator: torch.Generator, std: float = 0.02,
                  device: str = "cpu") -> torch.Tensor:
    """One tensor on the CPU: SigLIP LayerNorms at identity, Gemma RMSNorm's w of (1 + w) at 0, the rest N(0, std)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if "layer_norm" in name or "layernorm" in name:  # SigLIP LayerNorm: weight 1, bias 0
        t.fill_(1.0 if name.endswith("weight") else 0.0)
    elif name.endswith("norm.weight"):              # Gemma RMSNorm stores w of (1 + w)
        t.zero_()
    else:
        t.normal_(0.0, std, generator=generator)
    return t.cpu()


def random_state(config: PaliGemmaConfig, dtype: torch.dtype, seed: int = 0, std: float = 0.02,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the model in `dtype` on the CPU, drawn on `device`."""
    g = torch.Generator(device).manual_seed(seed)
    return {name: random_tensor(name, shape, dtype, g, std, device) for name, shape in parameter_shapes(config).items()}


class LazyRandomState(Mapping):
    """random_state drawn one tensor at a time, when it is asked for (each is asked for once by save_npz)."""

    def __init__(self, config: PaliGemmaConfig, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
        self.shapes, self.dtype, self.device = parameter_shapes(config), dtype, device
        self.generator = torch.Generator(device).manual_seed(seed)

    def __getitem__(self, name: str) -> torch.Tensor:
        return random_tensor(name, self.shapes[name], self.dtype, self.generator, device=self.device)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--name", choices=NAMES, help="a published size")
    src.add_argument("--config", type=Path, help="a config.json (or checkpoint directory) to copy the shapes from")
    p.add_argument("--layout", choices=["hf", "big_vision"], default="hf",
                   help="hf: a checkpoint directory (safetensors); big_vision: one release-layout .npz file")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 (hf), float32 (big_vision, as the .npz releases)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda: much faster)")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    config = named_config(args.name) if args.name else PaliGemmaConfig.from_pretrained(args.config)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.layout == "hf" else "float32"))
    start = time.time()
    if args.layout == "big_vision":
        if dtype == torch.float16:
            p.error("big_vision checkpoints are float32 or bfloat16")
        rows = min(config.image_token_index, config.text_config.vocab_size)
        files = [save_npz(LazyRandomState(config, dtype, args.seed, args.device), config, args.out, dtype=dtype,
                          embedding_rows=rows)]
    else:
        state = random_state(config, dtype, args.seed, device=args.device)
        config.save_pretrained(args.out)
        files = save_state_dict(state, args.out, args.max_shard_size)
    size = sum(f.stat().st_size for f in files) / 1e9
    print(f"wrote {len(files)} file(s), {size:.2f} GB, to {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
