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
import os
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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _layout(file: Path) -> tuple[int, dict]:
    """(where the data starts, the header: key -> {"dtype", "shape", "data_offsets"}) of a safetensors file: the
    format's 8-byte header length and JSON header, which safetensors checked when it opened the file. Only for Rows:
    safetensors reads a whole tensor to give any slice of it."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


class Rows:
    """One tensor of a checkpoint file, not yet read: `rows[a:b]` reads only those rows from the file (no memory
    map), converted to `dtype`; `rows.read()` the whole tensor. What a `convert` function (load_state_dict) gets."""

    def __init__(self, file: Path, fd: int, data_start: int, entry: dict, dtype: torch.dtype | None):
        self.file, self._fd, self.dtype = file, fd, dtype
        self._file_dtype = _DTYPES[entry["dtype"]]
        self.shape = torch.Size(entry["shape"])
        begin, end = entry["data_offsets"]
        self._offset, self.nbytes = data_start + begin, end - begin           # nbytes: in the file
        self._row_bytes = self.nbytes // self.shape[0] if self.shape.numel() and len(self.shape) else self.nbytes
        self.device = torch.device("cpu")

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        n = (stop - start) * self._row_bytes
        buf = torch.empty(n, dtype=torch.uint8)
        got = os.preadv(self._fd, [buf.numpy()], self._offset + start * self._row_bytes) if n else 0
        if got != n:
            raise CheckpointError(f"{self.file}: cannot read safetensors file (a tensor ends past the end of the file); "
                                  "is it truncated or corrupt?")
        t = buf.view(self._file_dtype).view(stop - start, *self.shape[1:]) if len(self.shape) else buf.view(self._file_dtype)[0]
        return t if self.dtype is None or not t.is_floating_point() else t.to(self.dtype)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(self.shape[0])  # clipped to the tensor, as a tensor's slicing is
        if step != 1:
            raise ValueError("Rows reads runs of consecutive rows")
        return self._rows(start, max(start, stop))

    def read(self) -> torch.Tensor:
        return self._rows(0, self.shape[0]) if len(self.shape) else self._rows(0, 1)


def load_state_dict(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                    progress: bool = False, convert=None) -> dict[str, torch.Tensor]:
    """Read all tensors of a checkpoint directory under nanopali's names, one tensor at a time.

    Tensors are read from the memory-mapped files and converted to `dtype` one by one, so loading
    a bf16 checkpoint in bf16 never holds more than the weights (plus one tensor in flight).
    `device` and `dtype` are checked first (nanopali.devices): a bad one is a UsageError, never blamed on the file.

    convert(name, rows: Rows) -> {name: tensor} | None, when given, is called for each tensor before it is read:
    it may read it in pieces and return what to store instead (a quantized form), or None to store the tensor as
    it is. The tensors are then read from the file (Rows), not mapped: a mapped page that was read stays in the process's
    resident memory as long as any tensor of the file lives, so reading through the map to convert would hold
    the whole float checkpoint next to its converted form (inference/quantize.py's `load_quantized`).
    """
    device = resolve_device(device)
    dtype = None if dtype is None else resolve_dtype(dtype)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    files = checkpoint_files(Path(path))
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="loading weights",
               disable=not progress, leave=False)
    for file in files:
        with _open_safetensors(file, device) as f, open(file, "rb") as raw:
            data_start, header = _layout(file) if convert is not None else (0, {})
            for key in f.keys():
                name = _name(key, file, state, origin)
                if name is None:
                    continue
                if convert is None:
                    tensor = _read(file, lambda: f.get_tensor(key))
                    state[name] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
                    nbytes = tensor.numel() * tensor.element_size()
                else:
                    rows = Rows(file, raw.fileno(), data_start, header[key], dtype)
                    converted = convert(name, rows)
                    state.update({name: rows.read().to(device)} if converted is None else converted)
                    nbytes = rows.nbytes
                origin[name] = key
                bar.update(nbytes)
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


def load_into(model: torch.nn.Module, path: Path, dtype: torch.dtype, device: torch.device, progress: bool = False,
              convert=None) -> None:
    """Assign a checkpoint directory's tensors to `model` (built on the meta device), checked strictly first: the
    file tensors become the parameters, converted to `dtype` one at a time, with no second copy of the weights.
    `convert` (see load_state_dict) may replace modules of `model` as their tensors are read; the files' names and
    shapes are then checked against the model before anything is read, from the headers."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if convert is not None:
        check_state_dict(expected, {k: shape for k, (shape, _) in tensor_specs(path).items()}, str(path))
    state = load_state_dict(path, dtype=dtype, device=device, progress=progress, convert=convert)
    if convert is None:
        check_state_dict(expected, state, str(path))
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
