"""The `info` command: describe a checkpoint directory (sizes, dtypes, parameters) without loading its weights.

It reads the real tensors' names, shapes and dtypes from the safetensors headers (no tensor data) and checks them
against config.json as loading does, and reads the tokenizer: a checkpoint that cannot load fails `info` with the
same error, and the parameter count is the files' own."""

from __future__ import annotations

import argparse
import json


def add_commands(sub) -> None:
    info = sub.add_parser("info", help="describe a checkpoint directory")
    info.add_argument("model_dir", nargs="?", help="default: the shipped model")
    info.add_argument("--json", action=argparse.BooleanOptionalAction, default=False)
    info.set_defaults(run=run_info)


def run_info(args) -> int:
    import torch

    from nanopali.config import PaliGemmaConfig
    from nanopali.errors import CheckpointError
    from nanopali.inputs.processor import Processor
    from nanopali.io.hf_checkpoint import check_state_dict, checkpoint_dir, checkpoint_files, tensor_specs
    from nanopali.models.paligemma import PaliGemma
    from nanopali.nn.moe import idle_expert_parameters
    from nanopali.paths import model_dir
    from nanopali.pipeline import VAE_FILE

    path = checkpoint_dir(model_dir(args.model_dir))
    config = PaliGemmaConfig.from_pretrained(path)
    files = checkpoint_files(path)
    specs = tensor_specs(path)  # the real tensors' names, shapes and dtypes, from the file headers
    with torch.device("meta"):
        expected = {k: v.shape for k, v in PaliGemma(config).state_dict().items()}
    check_state_dict(expected, {k: shape for k, (shape, _) in specs.items()}, str(path))  # what loading would say
    processor = Processor.from_pretrained(path)  # the tokenizer and image settings, checked as loading does
    tokenizer, t, v = processor.tokenizer, config.text_config, config.vision_config
    if len(tokenizer) > t.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                              f"{t.vocab_size} rows (text_config.vocab_size); they do not belong together")
    vae = path / VAE_FILE
    with torch.device("meta"):
        idle = idle_expert_parameters(PaliGemma(config))
    total = sum(shape.numel() for shape, _ in specs.values())
    info = {"model_dir": str(path), "generation": 2 if config.is_gemma2 else 1,
            "parameters": total, "active_parameters": total - idle,  # per token: k of the E experts
            "dtypes": sorted({dtype for _, dtype in specs.values()}), "tensors": len(specs),
            "size_bytes": sum(f.stat().st_size for f in files), "files": len(files),
            "image_size": v.image_size, "image_tokens": config.num_image_tokens, "vocab_rows": t.vocab_size,
            "tokenizer_vocab": len(tokenizer),
            "decoder": f"{t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads "
                       f"({t.num_key_value_heads} kv) of {t.head_dim}",
            "experts": (f"{t.num_local_experts} per sparse layer ({len(t.moe_layers or range(t.num_hidden_layers))} of "
                        f"{t.num_hidden_layers}), top-{t.num_experts_per_tok}, width "
                        f"{t.moe_intermediate_size or t.intermediate_size}" if t.num_local_experts else "none (dense)"),
            "vision": f"{v.num_hidden_layers} layers, width {v.hidden_size}, patch {v.patch_size}",
            "vqvae": str(vae) if vae.is_file() else None}
    if args.json:
        print(json.dumps(info))
    else:
        for k, val in info.items():
            val = f"none (no {VAE_FILE}; segment needs one)" if val is None else val
            print(f"{k:17s} {val:,}" if isinstance(val, int) else f"{k:17s} {val}")
    return 0
