"""Checkpoint files in the Hugging Face layout: read, check and write safetensors state dicts.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`. Real files spell the
same tensor three ways; all are mapped onto nanopali's names, which are the Hub's:

    Hub files                      vision_tower.vision_model.*   language_model.model.*   [language_model.lm_head.weight]
    transformers 5.x save          vision_tower.*                language_model.model.*
    transformers >= 4.52 in memory model.vision_tower[.vision_model].*  model.language_model.*  lm_head.weight

The output head is tied to the token embedding, so an `lm_head.weight` in a file is a copy and is
skipped, as is the non-persistent `embeddings.position_ids` buffer some old files carry. Every other
difference between the file and the model (missing, unexpected or mis-shaped tensors) is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from nanopali.devices import resolve_device, resolve_dtype
from nanopali.errors import CheckpointError, MissingFileError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# (prefix in a file, nanopali prefix); the first match wins, so longer prefixes come first.
_PREFIX_ALIASES = [
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
]
_SKIPPED = re.compile(r"^(language_model\.lm_head\.weight|lm_head\.weight|.*embeddings\.position_ids)$")


def canonical_key(key: str) -> str | None:
    """nanopali's name for a tensor name found in a file, or None for a tensor that is skipped."""
    if _SKIPPED.match(key):
        return None
    for prefix, canonical in _PREFIX_ALIASES:
        if key.startswith(prefix):
            return canonical + key[len(prefix):]
    return key


def checkpoint_dir(path: str | Path) -> Path:
    """`path` as a Path, checked to be a directory: a file (model.safetensors, config.json…) is a CheckpointError
    that says to pass its folder, a path that does not exist a MissingFileError."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        raise CheckpointError(f"{path} is a big_vision .npz, not a checkpoint directory: load it with its config "
                              "(PaliGemma.from_big_vision, nanopali.load(..., config=), --config) or write a directory "
                              "from it once with `nanopali convert`")
    if path.is_file():
        raise CheckpointError(f"{path} is a file; a model is a checkpoint directory (config.json, model.safetensors, "
                              f"tokenizer.model…): pass the folder that holds it")
    if not path.is_dir():
        raise MissingFileError(f"checkpoint directory {path} does not exist")
    return path


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    path = Path(path)
    if path.is_file():
        checkpoint_dir(path)  # raises: a file, not a directory
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError(f"weight_map must map tensor names to file names, got {type(weight_map).__name__}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing from {path}: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" (found {found} but no {INDEX_FILE})" if found else ""
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")


def load_state_dict(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Read all tensors of a checkpoint directory under nanopali's names, one tensor at a time.

    Tensors are read from the memory-mapped files and converted to `dtype` one by one, so loading
    a bf16 checkpoint in bf16 never holds more than the weights (plus one tensor in flight).
    `device` and `dtype` are checked first (nanopali.devices): a bad one is a UsageError, never blamed on the file.
    """
    device = resolve_device(device)
    dtype = None if dtype is None else resolve_dtype(dtype)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    files = checkpoint_files(Path(path))
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="loading weights",
               disable=not progress, leave=False)
    for file in files:
        with _open_safetensors(file, device) as f:
            for key in f.keys():
                name = _name(key, file, state, origin)
                if name is None:
                    continue
                tensor = _read(file, lambda: f.get_tensor(key))
                state[name] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
                origin[name] = key
                bar.update(tensor.numel() * tensor.element_size())
    bar.close()
    return state


def tensor_specs(path: str | Path) -> dict[str, tuple[torch.Size, str]]:
    """(shape, safetensors dtype such as "F32") of every tensor of a checkpoint directory under nanopali's names,
    read from the file headers only (no tensor data), with the same checks and errors as `load_state_dict`."""
    specs: dict[str, tuple[torch.Size, str]] = {}
    origin: dict[str, str] = {}
    for file in checkpoint_files(Path(path)):
        with _open_safetensors(file, torch.device("cpu")) as f:
            for key in f.keys():
                name = _name(key, file, specs, origin)
                if name is None:
                    continue
                sl = _read(file, lambda: f.get_slice(key))
                specs[name] = (torch.Size(sl.get_shape()), sl.get_dtype())
                origin[name] = key
    return specs


def _corrupt(file: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?")


def _open_safetensors(file: Path, device: torch.device):
    """safe_open on an already checked device: a SafetensorError here is the file's fault."""
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except SafetensorError as e:
        raise _corrupt(file, e) from None


def _read(file: Path, read):
    try:
        return read()
    except SafetensorError as e:
        raise _corrupt(file, e) from None


def _name(key: str, file: Path, seen: dict, origin: dict[str, str]) -> str | None:
    name = canonical_key(key)
    if name is not None and name in seen:
        raise CheckpointError(f"{file}: tensor {key!r} is a second copy of {name!r} (already read as {origin[name]!r})")
    return name


def check_state_dict(expected: dict[str, torch.Size], state: dict, where: str,
                     hint: str = "does config.json match the weights?") -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor.
    `state` maps names to tensors or to shapes; `hint` follows the title of the shape mismatches."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shape = {k: tuple(getattr(v, "shape", v)) for k, v in state.items()}  # tensors, or shapes (tensor_specs)
    shapes = sorted(f"{k}: file {shape[k]} vs config {tuple(s)}"
                    for k, s in expected.items() if k in state and shape[k] != tuple(s))
    problems = []
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         (f"shape mismatches ({hint})", shapes)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"  {title} ({len(items)}):\n    {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not fit the model:\n" + "\n".join(problems))


def load_into(model: torch.nn.Module, path: Path, dtype: torch.dtype, device: torch.device, progress: bool = False) -> None:
    """Assign a checkpoint directory's tensors to `model` (built on the meta device), checked strictly first: the
    file tensors become the parameters, converted to `dtype` one at a time, with no second copy of the weights."""
    state = load_state_dict(path, dtype=dtype, device=device, progress=progress)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, str(path))
    model.load_state_dict(state, strict=True, assign=True)


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read shard size {size!r}; use e.g. '5GB', '500MB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * base**power)


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write tensors as model.safetensors, or as shards plus an index when they exceed max_shard_size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous()
        size += nbytes
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return [path / n for n in names]
