"""llama.cpp as a contender in bench_generate.py: the checkpoint's Gemma language model as GGUF, timed by llama.cpp.

    pip install llama-cpp-python gguf      # optional; build llama.cpp for this processor:
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 gguf==0.19.0
    python benchmarks/bench_generate.py --model DIR --frameworks nanopali,llamacpp   # llamacpp = bf16, q8_0, q4_0

What a CPU user would run instead of nanopali: llama.cpp has no SigLIP tower for PaliGemma, so it gets the decoder
only, the same Gemma weights, and is timed on a prompt of the same length (image tokens + text), with the same
thread count. Its prompt is causal where PaliGemma's prefix attends both ways: the same work.

Conversion, once, cached in DIR/gguf/ (`ensure_gguf`): the decoder's tensors are written as llama.cpp's Gemma
(Gemma 2) model in bf16 with the `gguf` package (its tensor-name map, gguf.get_tensor_name_map; RMSNorm weights
stored as 1 + w, as llama.cpp's convert_hf_to_gguf.py does for Gemma); q8_0 and q4_0 are then made by llama.cpp's
own quantizer (llama_model_quantize, what `llama-quantize` runs). A random checkpoint has no tokenizer, so the file
declares none (tokenizer model "none" and the vocabulary size): llama.cpp then takes token ids, which is all a
benchmark feeds it. Timing (`LlamaCpp`): llama.cpp's own counters (llama_perf_context) for the prompt and for the
decode steps, greedy, with its logits of the last position only.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import numpy as np

KINDS = ("bf16", "q8_0", "q4_0")
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
PREFIX = "language_model.model."  # the decoder's tensors in nanopali's (= the Hub's) names


def gguf_path(checkpoint: Path, kind: str) -> Path:
    return Path(checkpoint) / "gguf" / f"language-model-{kind}.gguf"


def write_bf16(checkpoint: Path, out: Path) -> None:
    """The decoder of a PaliGemma checkpoint directory as a GGUF of llama.cpp's Gemma / Gemma 2 architecture."""
    import gguf
    import torch

    from nanopali import PaliGemmaConfig
    from nanopali.io.hf_checkpoint import load_state_dict

    cfg = PaliGemmaConfig.from_pretrained(checkpoint).text_config
    arch = gguf.MODEL_ARCH.GEMMA2 if cfg.post_norms else gguf.MODEL_ARCH.GEMMA
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tmp = out.with_suffix(".part")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    if cfg.post_norms:
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(cfg.vocab_size)
    state = load_state_dict(checkpoint)  # memory-mapped: each tensor is read when the writer writes it
    for name, t in state.items():
        if not name.startswith(PREFIX):
            continue
        gguf_name = names.get_name("model." + name[len(PREFIX):], try_suffixes=(".weight",))
        if gguf_name is None:
            raise RuntimeError(f"gguf has no llama.cpp name for {name}")
        if t.ndim == 1:  # norms: fp32, and Gemma's (1 + w) stored whole
            writer.add_tensor(gguf_name, (t.float() + 1 if name.endswith("norm.weight") else t.float()).numpy())
        else:
            writer.add_tensor(gguf_name, t.to(torch.bfloat16).view(torch.int16).numpy(),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    tmp.rename(out)


def silence(llama_cpp) -> None:
    """llama.cpp logs every tensor and buffer to stderr: keep only warnings and errors."""
    global _LOG  # the callback must outlive the call
    _LOG = llama_cpp.llama_log_callback(lambda level, text, _: level in (3, 4) and sys.stderr.write(text.decode()) and None)
    llama_cpp.llama_log_set(_LOG, ctypes.c_void_p())


def quantize(src: Path, out: Path, kind: str, threads: int) -> None:
    """llama.cpp's own quantizer, as `llama-quantize src out Q8_0` runs it."""
    import llama_cpp

    silence(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = threads
    tmp = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    tmp.rename(out)


def ensure_gguf(checkpoint: Path, kinds, threads: int) -> dict[str, Path]:
    """The GGUF files of `kinds`, converted on the first call and kept in checkpoint/gguf/."""
    bf16 = gguf_path(checkpoint, "bf16")
    bf16.parent.mkdir(exist_ok=True)
    if not bf16.is_file():
        print(f"converting the language model of {checkpoint} to {bf16} (once)", file=sys.stderr, flush=True)
        write_bf16(checkpoint, bf16)
    for kind in kinds:
        if kind != "bf16" and not gguf_path(checkpoint, kind).is_file():
            print(f"quantizing {bf16.name} to {kind} with llama.cpp (once)", file=sys.stderr, flush=True)
            quantize(bf16, gguf_path(checkpoint, kind), kind, threads)
    return {kind: gguf_path(checkpoint, kind) for kind in kinds}


def weight_bytes(path: Path) -> int:
    """Bytes of the tensors in a GGUF file: what one decode step reads (the embedding is also the output head)."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


class LlamaCpp:
    """One GGUF model and context, with prefill / step / generate as bench_generate.py's workers call them. Times are
    llama.cpp's own (llama_perf_context): `last_prompt_ms` and `last_eval_ms` after each call."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        import llama_cpp
        self.lib = llama_cpp
        silence(llama_cpp)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = False
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.attention = "llama.cpp (flash attention: auto)"
        self.threads = threads

    def _decode(self, tokens: list[int]) -> np.ndarray:
        lib = self.lib
        array = (lib.llama_token * len(tokens))(*tokens)
        if lib.llama_decode(self.ctx, lib.llama_batch_get_one(array, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,))

    def perf(self) -> tuple[float, float]:
        """(prompt ms, decode ms) that llama.cpp counted since the last reset."""
        p = self.lib.llama_perf_context(self.ctx)
        return p.t_p_eval_ms, p.t_eval_ms

    def prefill(self, ids: list[int]) -> int:
        """A fresh sequence: the prompt in one batch; returns the greedy next token."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.lib.llama_perf_context_reset(self.ctx)
        return int(self._decode(ids).argmax())

    def step(self, token: int) -> int:
        return int(self._decode([token]).argmax())


def run(path: Path, ids: list[int], new_tokens: int, runs: int, threads: int, log) -> dict:
    """Warm-up + `runs` timed runs of prefill + `new_tokens` decode steps; llama.cpp's own times per run."""
    fw = LlamaCpp(path, threads, len(ids) + new_tokens + 8)
    prompt_ms, decode_ms, wall = [], [], []
    for r in range(runs + 1):
        start = time.perf_counter()
        token = fw.prefill(ids)
        tokens = [token]
        for _ in range(new_tokens):
            tokens.append(fw.step(tokens[-1]))
        wall.append(time.perf_counter() - start)
        p, d = fw.perf()
        prompt_ms.append(p)
        decode_ms.append(d)
        log(r, p / 1000, d / 1000, wall[-1])
    return dict(prompt_ms=prompt_ms, decode_ms=decode_ms, wall_s=wall, tokens=tokens, attention=fw.attention)
