"""The `info` command: describe a checkpoint directory (sizes, dtypes, parameters) without loading its weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub) -> None:
    info = sub.add_parser("info", help="describe a checkpoint directory")
    info.add_argument("model_dir", nargs="?", help="default: the shipped model")
    info.add_argument("--json", action=argparse.BooleanOptionalAction, default=False)
    info.set_defaults(run=run_info)


def run_info(args) -> int:
    import torch
    from safetensors import safe_open

    from nanopali.config import PaliGemmaConfig
    from nanopali.io.hf_checkpoint import checkpoint_files
    from nanopali.models.paligemma import PaliGemma
    from nanopali.paths import default_model_dir

    path = Path(args.model_dir) if args.model_dir else default_model_dir()
    config = PaliGemmaConfig.from_pretrained(path)
    files = checkpoint_files(path)
    with torch.device("meta"):
        n = sum(p.numel() for p in PaliGemma(config).parameters())
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
