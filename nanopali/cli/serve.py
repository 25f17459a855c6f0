"""The `serve` command: the OpenAI-compatible HTTP server (nanopali/serve), with its limits as flags."""

from __future__ import annotations

import argparse
import os

from nanopali.cli.common import model_options

KEY_VAR = "NANOPALI_API_KEY"
DEFAULT_NAME = "nanopali-default"  # the served name of the shipped default model


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP API and a web page (pip install -e '.[serve]')",
                       setup=_options)
    s.set_defaults(run=run)


def _options(s: argparse.ArgumentParser) -> None:
    model_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    s.add_argument("--served-model-name", help="the model name clients send (default: the checkpoint folder's name; "
                   f"{DEFAULT_NAME} without --model)")
    s.add_argument("--max-batch", type=int, default=8, help="rows decoded together at most (default 8)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503 (default 64)")
    s.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${KEY_VAR}; none: no key)")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take before a 504 (default 300)")
    s.add_argument("--max-body-bytes", type=int, default=20 * 2**20, help="largest request body (default 20 MiB)")
    s.add_argument("--max-image-pixels", type=int, default=25_000_000,
                   help="largest image, width x height (default 25 million: a decompression-bomb guard)")
    s.add_argument("--allow-local-images", metavar="DIR",
                   help="let file:// image URLs read files inside DIR (never outside it, whatever `..` or "
                        "symlinks say)")
    s.add_argument("--allow-remote-images", action=argparse.BooleanOptionalAction, default=False,
                   help="let the server fetch http(s):// image URLs (default: refused)")
    s.add_argument("--siglip", nargs="?", const="", metavar="DIR",
                   help="also serve a contrastive SigLIP (POST /v1/embeddings, /v1/classify): DIR, or without DIR the "
                        "shipped toy-world one")
    s.add_argument("--siglip-name", help="the SigLIP's served name (default: its folder's name; nanopali-siglip for the "
                                         "shipped one)")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    from pathlib import Path

    from nanopali.errors import UsageError

    for name in ("port", "max_batch", "max_queue", "timeout", "max_body_bytes", "max_image_pixels", "threads"):
        value = getattr(args, name)
        ok = value is None or (0 <= value < 65536 if name == "port" else value > 0)
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be {'0..65535' if name == 'port' else '> 0'}")
    local = None
    if args.allow_local_images is not None:
        local = Path(args.allow_local_images).expanduser()
        if not local.is_dir():
            raise UsageError(f"--allow-local-images {args.allow_local_images}: not a directory")
    try:
        import torch

        from nanopali.io import big_vision
        from nanopali.io.hf_checkpoint import checkpoint_dir
        from nanopali.paths import default_siglip_dir, model_dir
        from nanopali.serve.app import Settings
        from nanopali.serve.images import ImagePolicy
        from nanopali.serve.server import serve
    except ImportError as e:
        raise UsageError(f"nanopali serve needs the serve extra ({e.name} is missing): "
                         "pip install -e '.[serve]'") from None
    from nanopali.cli.common import load
    from nanopali.devices import resolve_device, resolve_dtype

    resolve_device(args.device), resolve_dtype(args.dtype)  # checked before listening, as the model folder is
    if args.model is not None and big_vision.is_npz(args.model):
        big_vision.check_file(args.model)
        path = Path(args.model)
    else:
        path = checkpoint_dir(model_dir(args.model))  # the default, a shipped name ("moe") or a directory
    siglip = None if args.siglip is None else checkpoint_dir(args.siglip or default_siglip_dir())
    if args.threads:
        torch.set_num_threads(args.threads)
    api_key = args.api_key if args.api_key is not None else os.environ.get(KEY_VAR) or None
    name = args.served_model_name or (DEFAULT_NAME if args.model is None else path.stem)
    siglip_name = None if siglip is None else args.siglip_name or ("nanopali-siglip" if not args.siglip else siglip.name)
    if siglip_name is not None and siglip_name == name:
        raise UsageError(f"--siglip-name {siglip_name}: the PaliGemma is served under that name already")
    settings = Settings(model_name=name, max_batch=args.max_batch,
                        max_queue=args.max_queue, api_key=api_key, timeout=args.timeout,
                        max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                        images=ImagePolicy(local_dir=local, remote=args.allow_remote_images,
                                           max_bytes=args.max_body_bytes), siglip_name=siglip_name)

    def load_siglip():
        from nanopali.zero_shot import load_contrastive
        return load_contrastive(siglip, dtype=args.dtype, device=args.device)
    return serve(settings, lambda: load(args), args.host, args.port, args.log_level,
                 load_siglip=None if siglip is None else load_siglip)
