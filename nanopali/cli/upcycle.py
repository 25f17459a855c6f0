"""The `upcycle` command: a dense checkpoint directory -> a mixture-of-experts one, to train further.

    nanopali upcycle DIR OUT --experts 8 --top-k 2 [--noise 0.01] [--router-std 0.01] [--aux-loss-coef 0.01]

Every decoder layer becomes sparse: its experts are copies of its dense MLP and its router starts small
(nanopali/train/upcycle.py); the upcycled model's logits are the dense model's. OUT gets the weights (in the
dense checkpoint's dtype), config.json, DIR's tokenizer and processor files, and its vae-oid.npz if it has one.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def add_commands(sub) -> None:
    up = sub.add_parser("upcycle", help="turn a dense checkpoint into a mixture-of-experts one (sparse upcycling)")
    up.add_argument("model_dir", help="dense checkpoint directory")
    up.add_argument("out", help="new directory for the mixture-of-experts checkpoint")
    up.add_argument("--experts", type=int, default=8, help="experts per layer, each a copy of the dense MLP (default 8)")
    up.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    up.add_argument("--noise", type=float, default=0.0,
                    help="router_jitter_noise: in training, each layer input times U(1 - noise, 1 + noise) (default 0)")
    up.add_argument("--router-std", type=float, default=0.01, help="the router's initial weights ~ N(0, this)")
    up.add_argument("--aux-loss-coef", type=float, default=0.01, help="weight of the load-balancing loss (default 0.01)")
    up.add_argument("--seed", type=int, default=0, help="seed of the router's initial weights")
    up.set_defaults(run=run_upcycle)


def run_upcycle(args) -> int:
    import torch

    from nanopali.errors import UsageError
    from nanopali.inputs.processor import Processor
    from nanopali.io.hf_checkpoint import checkpoint_dir
    from nanopali.models.paligemma import PaliGemma
    from nanopali.pipeline import VAE_FILE
    from nanopali.train.upcycle import upcycle

    source, out = checkpoint_dir(args.model_dir), Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory; name a new one")
    if args.experts < 1:
        raise UsageError(f"--experts must be at least 1, got {args.experts}")
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(_file_dtype(source), torch.float32)
    processor = Processor.from_pretrained(source)
    dense = PaliGemma.from_pretrained(source, dtype=dtype)
    model = upcycle(dense, args.experts, args.top_k, args.noise, args.router_std, args.aux_loss_coef, args.seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if (source / VAE_FILE).is_file():
        shutil.copy(source / VAE_FILE, out / VAE_FILE)
    total = sum(p.numel() for p in model.parameters())
    print(f"upcycled {source} -> {out}: {args.experts} experts, top-{args.top_k}, {total:,} parameters")
    return 0


def _file_dtype(path: Path) -> str:
    """The safetensors dtype of the checkpoint's decoder norm (its weights' dtype)."""
    from nanopali.io.hf_checkpoint import tensor_specs

    return tensor_specs(path)["language_model.model.norm.weight"][1]
