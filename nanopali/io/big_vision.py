"""big_vision's PaliGemma checkpoints (`paligemma-3b-pt-224.npz`, `paligemma2-3b-pt-448.b16.npz`, …): read and write.

A release is one .npz (a zip of .npy arrays), one key per parameter group as big_vision's
`tree_flatten_with_names` names it (with or without a leading `params/`), the layers of both towers
stacked on the first axis (`nn.scan`). Each group is a stack of blocks; each block is a *view* of one
nanopali (= Hugging Face) parameter, so reading and writing are one table (`layout`):

    npz key (after params/)                          stack    block            view of the parameter (per layer)
    img/embedding/kernel                             -        (P, P, 3, d)     patch_embedding.weight (d, 3, P, P)
    img/pos_embedding                                -        (1, n, d)        position_embedding.weight (n, d)
    img/Transformer/encoderblock/.../query/kernel    L        (d, h, d/h)      self_attn.q_proj.weight (d, d)
    img/Transformer/encoderblock/.../out/kernel      L        (h, d/h, d)      self_attn.out_proj.weight (d, d)
    img/Transformer/encoderblock/MlpBlock_0/Dense_0  L        (d, f)           mlp.fc1.weight (f, d) transposed
    img/head/kernel                                  -        (d, D)           multi_modal_projector.linear.weight
    llm/embedder/input_embedding                     -        (V, D)           embed_tokens.weight, first V rows
    llm/layers/attn/q_einsum/w                       L        (N, D, H)        self_attn.q_proj.weight (N*H, D)
    llm/layers/attn/kv_einsum/w                      L, 2     (K, D, H)        k_proj / v_proj.weight (K*H, D)
    llm/layers/attn/attn_vec_einsum/w                L        (N, H, D)        o_proj.weight (D, N*H)
    llm/layers/mlp/gating_einsum                     L, 2     (D, F)           gate_proj / up_proj.weight transposed
    llm/layers/mlp/linear                            L        (F, D)           down_proj.weight transposed
    llm/layers/pre_ffw_norm/scale                    L        (D,)             Gemma 1: post_attention_layernorm (HF's name)

(norm scales and biases map one to one; Gemma's RMSNorm stores w of (1 + w) in both; a model whose kv
heads equal its heads has big_vision's fused `qkv_einsum/w` (L, 3, N, D, H) instead of q/kv.)

Reading streams each array from the zip in chunks of `CHUNK` bytes and copies them, converted to the
target dtype, straight into the parameter's view: no whole array is ever held, so the 11.7 GB float32
3B release loads into bfloat16 at the bf16 model's size plus a chunk (BENCHMARKS.md). (Memory-mapping
the members would read the same bytes, but every page touched stays in the process's RSS until the map
is closed, i.e. a whole 4.8 GB stacked array.) A ZIP_DEFLATED npz streams the same way, only slower.
bfloat16 files store raw 2-byte values, which numpy reports as `|V2`: they are read as bfloat16, as
big_vision's `utils.recover_dtype` does.

The release embedding has 257152 rows (the tokenizer's tokens), the Hub configs 257216: rows past the
file's are zero. `<image>` (257152) is the first of them, its embedding replaced by the image features,
and generation never produces those ids (vocab_limit = the tokenizer's size).
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanopali.config import PaliGemmaConfig
from nanopali.errors import CheckpointError, MissingFileError
from nanopali.io.hf_checkpoint import check_state_dict

CHUNK = 16 << 20                  # bytes read (and converted) at a time
PREFIX = "params/"                # big_vision checkpoints nest the tree under "params"
EMBEDDING = "llm/embedder/input_embedding"
_BF16 = np.dtype("V2")            # how numpy reads a bfloat16 array saved by np.savez
_TORCH = {np.dtype("float32"): torch.float32, np.dtype("float16"): torch.float16, np.dtype("float64"): torch.float64,
          _BF16: torch.bfloat16}
_PER_LAYER = re.compile(r"(encoderblock|layers)_\d+/")


def is_npz(path) -> bool:
    """Whether `path` names a big_vision .npz file (by its name: the file may not exist yet)."""
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".npz")


@dataclass(frozen=True)
class Block:
    """array[index] of npz key `key` is `view(parameter)`, the parameter `name` of shape `shape`."""

    key: str
    index: tuple[int, ...]
    name: str
    shape: tuple[int, ...]
    view: Callable[[torch.Tensor], torch.Tensor]


def _same(w):
    return w


def _transposed(w):
    return w.T


def _heads_last(heads: int, head_dim: int):
    """(heads*head_dim, D) -> (D, heads, head_dim): flax's query/key/value kernels."""
    return lambda w: w.view(heads, head_dim, -1).permute(2, 0, 1)


def _heads_first(heads: int, head_dim: int):
    """(heads*head_dim, D) -> (heads, D, head_dim): Gemma's q/kv einsum."""
    return lambda w: w.view(heads, head_dim, -1).permute(0, 2, 1)


def _heads_out(heads: int, head_dim: int):
    """(D, heads*head_dim) -> (heads, head_dim, D): the output projections."""
    return lambda w: w.view(-1, heads, head_dim).permute(1, 2, 0)


def layout(config: PaliGemmaConfig) -> list[Block]:
    """Every block of a big_vision PaliGemma checkpoint of `config`, one per nanopali parameter."""
    v, t = config.vision_config, config.text_config
    blocks: list[Block] = []

    def add(key, name, shape, view=_same, index=()):
        blocks.append(Block(key, index, name, tuple(shape), view))

    d, f, P, h = v.hidden_size, v.intermediate_size, v.patch_size, v.num_attention_heads
    vis = "vision_tower.vision_model."
    add("img/embedding/kernel", vis + "embeddings.patch_embedding.weight", (d, 3, P, P), lambda w: w.permute(2, 3, 1, 0))
    add("img/embedding/bias", vis + "embeddings.patch_embedding.bias", (d,))
    add("img/pos_embedding", vis + "embeddings.position_embedding.weight", (v.num_patches, d), lambda w: w[None])
    enc = "img/Transformer/encoderblock/"
    for i in range(v.num_hidden_layers):
        ours = f"{vis}encoder.layers.{i}."
        for bv, norm in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            add(f"{enc}{bv}/scale", f"{ours}{norm}.weight", (d,), index=(i,))
            add(f"{enc}{bv}/bias", f"{ours}{norm}.bias", (d,), index=(i,))
        attn = f"{enc}MultiHeadDotProductAttention_0/"
        for bv, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            add(f"{attn}{bv}/kernel", f"{ours}self_attn.{proj}.weight", (d, d), _heads_last(h, d // h), (i,))
            add(f"{attn}{bv}/bias", f"{ours}self_attn.{proj}.bias", (d,), lambda b, h=h: b.view(h, -1), (i,))
        add(f"{attn}out/kernel", f"{ours}self_attn.out_proj.weight", (d, d), _heads_out(h, d // h), (i,))
        add(f"{attn}out/bias", f"{ours}self_attn.out_proj.bias", (d,), index=(i,))
        for bv, fc, shape in (("Dense_0", "fc1", (f, d)), ("Dense_1", "fc2", (d, f))):
            add(f"{enc}MlpBlock_0/{bv}/kernel", f"{ours}mlp.{fc}.weight", shape, _transposed, (i,))
            add(f"{enc}MlpBlock_0/{bv}/bias", f"{ours}mlp.{fc}.bias", shape[:1], index=(i,))
    add("img/Transformer/encoder_norm/scale", vis + "post_layernorm.weight", (d,))
    add("img/Transformer/encoder_norm/bias", vis + "post_layernorm.bias", (d,))
    D = t.hidden_size
    add("img/head/kernel", "multi_modal_projector.linear.weight", (D, d), _transposed)
    add("img/head/bias", "multi_modal_projector.linear.bias", (D,))

    N, K, H, F = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size
    llm = "language_model.model."
    add(EMBEDDING, llm + "embed_tokens.weight", (t.vocab_size, D))
    norms = [("pre_attention_norm", "input_layernorm")]
    norms += ([("pre_ffw_norm", "pre_feedforward_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
               ("post_ffw_norm", "post_feedforward_layernorm")] if t.post_norms
              else [("pre_ffw_norm", "post_attention_layernorm")])
    for i in range(t.num_hidden_layers):
        ours = f"{llm}layers.{i}."
        q, k, v_, o = (f"{ours}self_attn.{p}_proj.weight" for p in "qkvo")
        if K == N:  # big_vision fuses q, k and v when every query head has its own kv head
            for j, name in enumerate((q, k, v_)):
                add("llm/layers/attn/qkv_einsum/w", name, (N * H, D), _heads_first(N, H), (i, j))
        else:
            add("llm/layers/attn/q_einsum/w", q, (N * H, D), _heads_first(N, H), (i,))
            for j, name in enumerate((k, v_)):
                add("llm/layers/attn/kv_einsum/w", name, (K * H, D), _heads_first(K, H), (i, j))
        add("llm/layers/attn/attn_vec_einsum/w", o, (D, N * H), _heads_out(N, H), (i,))
        for j, proj in enumerate(("gate_proj", "up_proj")):
            add("llm/layers/mlp/gating_einsum", f"{ours}mlp.{proj}.weight", (F, D), _transposed, (i, j))
        add("llm/layers/mlp/linear", f"{ours}mlp.down_proj.weight", (D, F), _transposed, (i,))
        for bv, norm in norms:
            add(f"llm/layers/{bv}/scale", f"{ours}{norm}.weight", (D,), index=(i,))
    add("llm/final_norm/scale", llm + "norm.weight", (D,))
    return blocks


def array_shapes(blocks: list[Block], embedding_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of each npz array: its stack dimensions, then the block's (the view of a meta parameter)."""
    shapes: dict[str, tuple[int, ...]] = {}
    stacks: dict[str, list[tuple[int, ...]]] = {}
    for b in blocks:
        stacks.setdefault(b.key, []).append(b.index)
        shapes[b.key] = tuple(b.view(torch.empty(b.shape, device="meta")).shape)
    for key, indices in stacks.items():
        shapes[key] = tuple(max(i[j] for i in indices) + 1 for j in range(len(indices[0]))) + shapes[key]
    if embedding_rows is not None:
        shapes[EMBEDDING] = (embedding_rows, *shapes[EMBEDDING][1:])
    return shapes


# ------------------------------------------------------------------------------------------------ the npz file

@dataclass(frozen=True)
class Array:
    """One .npy member of an npz: where it is and what its header says."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header_bytes: int  # the .npy header's length: the data starts after it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class NpzFile:
    """An .npz opened for streaming: every array's shape and dtype from its .npy header (no data read), and its
    data in chunks (`blocks`). Keys lose a leading `params/`. Problems are CheckpointErrors naming the file.

    Stored (uncompressed) members, as np.savez writes them, are read at their offset in the file, straight into
    the chunk buffer (no CRC check: like safetensors; a truncated file is still found); deflated ones through
    zipfile, which decompresses and checks their CRC."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"big_vision checkpoint {self.path} does not exist"
                                   if not self.path.is_dir() else f"{self.path} is a directory, not an .npz file")
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self.path}: not a readable .npz file ({e}); is it truncated or corrupt?") from None
        self.arrays: dict[str, Array] = {}
        for info in self.zip.infolist():
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{self.path}: holds {info.filename!r}, which is not a .npy array: not an .npz file")
            key = info.filename[:-len(".npy")].removeprefix(PREFIX)
            if key in self.arrays:
                raise CheckpointError(f"{self.path}: the array {key!r} is stored twice (with and without {PREFIX!r})")
            with self._open(info) as f:
                shape, fortran, dtype = self._header(f, key)
                a = Array(info, shape, dtype, fortran, f.tell())
            if a.header_bytes + a.nbytes != info.file_size:
                raise CheckpointError(f"{self.path}: the array {key!r} holds {info.file_size - a.header_bytes} bytes but "
                                      f"its .npy header describes {a.nbytes} ({dtype.str} {shape}); is the file corrupt?")
            self.arrays[key] = a
        self.compressed = any(a.info.compress_type != zipfile.ZIP_STORED for a in self.arrays.values())

    def __enter__(self) -> "NpzFile":
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def _open(self, info: zipfile.ZipInfo):
        try:
            return self.zip.open(info)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
            raise CheckpointError(f"{self.path}: cannot read {info.filename!r} ({e}); is the file truncated or corrupt?") from None

    def _header(self, f, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(f)
            if version == (2, 0):
                return np.lib.format.read_array_header_2_0(f)
            raise ValueError(f".npy format version {version} is not supported")
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
            raise CheckpointError(f"{self.path}: the array {key!r} has no readable .npy header ({e}); is the file "
                                  "truncated or corrupt?") from None

    @contextmanager
    def _data(self, key: str):
        """A binary file object at the first data byte of array `key`; on leaving, a deflated member is read to
        its end, which makes zipfile check its CRC."""
        a = self.arrays[key]
        try:
            if a.info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb", buffering=0) as f:
                    f.seek(a.info.header_offset)
                    local = f.read(30)  # the zip's local file header: signature ... name length, extra length
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise zipfile.BadZipFile("bad local file header")
                    name, extra = struct.unpack("<HH", local[26:30])
                    f.seek(a.info.header_offset + 30 + name + extra + a.header_bytes)
                    yield f
                return
            with self.zip.open(a.info) as f:
                self._read(f, key, a.header_bytes)
                yield f
                if f.read(1):
                    raise zipfile.BadZipFile("more data than its .npy header describes")
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise CheckpointError(f"{self.path}: cannot read the array {key!r} ({e}); is the file truncated or corrupt?") from None

    def blocks(self, key: str, stack_dims: int) -> Iterator[tuple[tuple[int, ...], int, torch.Tensor]]:
        """Yield (stack index, first row, rows) of array `key` in file order: the rows are consecutive slices of
        the block array[index] along its first axis, as a CPU tensor of the stored dtype (at most CHUNK bytes,
        or one row); the tensor's memory is reused for the next chunk."""
        a = self.arrays[key]
        stack, block = a.shape[:stack_dims], a.shape[stack_dims:]
        rows, row_shape = (block[0], block[1:]) if block else (1, ())
        row_bytes = math.prod(row_shape) * a.dtype.itemsize
        per_chunk = max(1, CHUNK // max(row_bytes, 1))
        with self._data(key) as f:
            if a.fortran_order:  # rare (np.savez of a transposed numpy array): the whole array, then its blocks
                whole = self._tensor(self._read(f, key, a.nbytes), a.dtype, a.shape[::-1]).permute(
                    *reversed(range(len(a.shape))))
                for index in np.ndindex(*stack):
                    yield index, 0, whole[index]
                return
            buffer = bytearray(min(rows, per_chunk) * row_bytes)
            for index in np.ndindex(*stack):
                for r0 in range(0, rows, per_chunk):
                    n = min(per_chunk, rows - r0)
                    view = self._read(f, key, n * row_bytes, into=memoryview(buffer)[:n * row_bytes])
                    yield index, r0, self._tensor(view, a.dtype, (n, *row_shape) if block else ())

    def _read(self, f, key: str, nbytes: int, into: memoryview | None = None) -> memoryview:
        """Exactly `nbytes` from `f` (into `into`, or a new buffer)."""
        out = into if into is not None else memoryview(bytearray(nbytes))
        done = 0
        while done < nbytes:
            got = f.readinto(out[done:])
            if not got:
                raise EOFError(f"the array {key!r} ends after {done} of {nbytes} bytes")
            done += got
        return out

    @staticmethod
    def _tensor(raw: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if dtype == _BF16:
            return torch.frombuffer(raw, dtype=torch.bfloat16).view(shape)
        native = dtype.newbyteorder("=")
        if dtype != native:  # a big-endian file
            return torch.from_numpy(np.frombuffer(raw, dtype).astype(native).reshape(shape))
        return torch.frombuffer(raw, dtype=_TORCH[native]).view(shape)


# ------------------------------------------------------------------------------------------------ reading

def load_state_dict(path: str | os.PathLike, config: PaliGemmaConfig, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """nanopali's parameters of `config` from a big_vision checkpoint, in `dtype` on `device` (both already
    checked by the caller). Every key and shape is checked before any data is read: one CheckpointError lists
    what is missing, unexpected or mis-shaped."""
    blocks = layout(config)
    with NpzFile(path) as npz:
        rows = check_arrays(npz, blocks, config)
        state = {b.name: torch.empty(b.shape, dtype=dtype, device=device) for b in blocks}
        views = {(b.key, b.index): b.view(state[b.name][:rows] if b.key == EMBEDDING else state[b.name])
                 for b in blocks}
        embedding = state[next(b.name for b in blocks if b.key == EMBEDDING)]
        embedding[rows:].zero_()  # rows the release does not have (see the module docstring)
        stack_dims = {b.key: len(b.index) for b in blocks}
        total = sum(npz.arrays[key].info.file_size for key in stack_dims)
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
                  leave=False) as bar:
            for key in npz.arrays:  # file order: one pass over the file
                for index, r0, chunk in npz.blocks(key, stack_dims[key]):
                    view = views[key, index]
                    (view[r0:r0 + len(chunk)] if chunk.ndim else view).copy_(chunk)
                    bar.update(chunk.numel() * chunk.element_size())
    return state


def check_file(path: str | os.PathLike) -> Path:
    """`path`, checked to be a readable .npz of floating-point PaliGemma arrays (headers only, no data read), so
    that a wrong file is named before anything else is asked for (a config, a tokenizer)."""
    with NpzFile(path) as npz:
        _check_kind(npz)
    return npz.path


def _check_kind(npz: NpzFile) -> None:
    keys = list(npz.arrays)
    if not any(k.startswith(("img/", "llm/")) for k in keys):
        vae = " (it looks like the mask VQ-VAE, vae-oid.npz: segment takes it as vae=)" if any(
            k.startswith(("_vq_vae.", "encoder.", "decoder.")) for k in keys) else ""
        shown = ", ".join(repr(k) for k in keys[:4]) + (", …" if len(keys) > 4 else "")
        raise CheckpointError(f"{npz.path} is not a big_vision PaliGemma checkpoint: none of its {len(keys)} arrays "
                              f"is under img/ or llm/ (it holds {shown or 'nothing'}){vae}")
    bad = sorted(f"{k}: {a.dtype.str}" for k, a in npz.arrays.items() if a.dtype.newbyteorder("=") not in _TORCH)
    if bad:
        raise CheckpointError(f"{npz.path}: arrays that are not floating-point weights (float32, float16, bfloat16 "
                              f"stored as |V2): {', '.join(bad)}")


def check_arrays(npz: NpzFile, blocks: list[Block], config: PaliGemmaConfig) -> int:
    """Raise a CheckpointError unless `npz` holds exactly the arrays of `blocks`, floating point, of their
    shapes; return the embedding's row count (at most the config's, which pads the rest)."""
    _check_kind(npz)
    t = config.text_config
    embedding = npz.arrays.get(EMBEDDING)
    rows = embedding.shape[0] if embedding is not None and embedding.shape else t.vocab_size
    expected = array_shapes(blocks, embedding_rows=min(rows, t.vocab_size))
    hint = ("; this reader takes the released layout, whose layers are stacked in one array per group"
            if any(_PER_LAYER.search(k) for k in npz.arrays) else "")
    try:
        check_state_dict(expected, {k: a.shape for k, a in npz.arrays.items()}, str(npz.path),
                         hint="does the config match the weights?")
    except CheckpointError as e:
        raise CheckpointError(f"{e}{hint}") from None
    return rows


# ------------------------------------------------------------------------------------------------ writing

def save_npz(tensors: Mapping[str, torch.Tensor], config: PaliGemmaConfig, path: str | os.PathLike,
             dtype: torch.dtype = torch.float32, embedding_rows: int | None = None, compress: bool = False,
             progress: bool = False) -> Path:
    """Write nanopali's parameters (`tensors[name]`, each read once, so a lazy mapping works) as a big_vision
    checkpoint in the release layout: sorted `params/…` keys, float32 or bfloat16 (`|V2`) arrays, the first
    `embedding_rows` rows of the embedding (default: all); `compress=True` deflates them. Written to a temporary
    file and renamed."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"big_vision checkpoints are float32 or bfloat16, not {dtype}")
    blocks = layout(config)
    shapes = array_shapes(blocks, embedding_rows)
    by_key: dict[str, list[Block]] = {}
    for b in blocks:
        by_key.setdefault(b.key, []).append(b)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    descr = "<V2" if dtype == torch.bfloat16 else "<f4"  # "<V2": how ml_dtypes' bfloat16 writes itself (the releases)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED, allowZip64=True) as zf, \
            tqdm(total=len(blocks), desc="writing", disable=not progress, leave=False) as bar:
        for key in sorted(by_key):
            with zf.open(PREFIX + key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shapes[key]})
                for b in sorted(by_key[key], key=lambda b: b.index):
                    tensor = tensors[b.name]
                    if key == EMBEDDING:
                        tensor = tensor[:shapes[key][0]]
                    block = b.view(tensor.detach()).to("cpu", dtype).contiguous()
                    f.write(block.view(torch.int16).numpy() if dtype == torch.bfloat16 else block.numpy())
                    bar.update()
    tmp.replace(path)
    return path
