"""Benchmark generation: prefill latency, decode tokens/s and peak memory of nanopali vs transformers.

    python benchmarks/bench_generate.py --model /tmp/pg3b --new-tokens 16 --runs 3
    python benchmarks/bench_generate.py --quick            # 2-layer model of the 3B's widths, about a minute
    python benchmarks/bench_generate.py --model /tmp/pg-tiny --new-tokens 4 --runs 1   # smoke check, seconds
    python benchmarks/bench_generate.py --model /tmp/pg3b --device cuda --new-tokens 64 --runs 3   # on a GPU

Frameworks (--frameworks): nanopali (its default: the one-row decode products take inference/native.py's
hand-written kernels, inference/cpu_kernels.py's compiled loop or torch's kernels, whichever gave the fastest
decode steps in its first steps on this machine, and large elementwise ops are fused), nanopali-native (the
hand-written kernels forced), nanopali-loop (the compiled loop forced, the default before the choice
was measured), nanopali-plain (fast=False: plain PyTorch, F.linear everywhere), nanopali-int8
(quantize="int8"), nanopali-int4
(quantize="int4": group-wise int4 decoder layers, int8 head), transformers. With --device cuda the
default is nanopali (each decode step replayed as a CUDA graph, inference/cuda_graph.py), nanopali-compile
(compile=True: the step through torch.compile, then replayed as a CUDA graph; inference/compiled.py; its warm-up
run compiles), nanopali-eager (cuda_graphs=False: the step run eagerly), nanopali-compile-int8 (int8 weights,
compiled step) and transformers. llamacpp (= llamacpp-bf16, llamacpp-q8_0,
llamacpp-q4_0): llama.cpp on the checkpoint's language model converted to GGUF once (benchmarks/llamacpp.py;
optional: pip install llama-cpp-python gguf), timed by its own counters on a prompt of the same length; it has
no vision tower, so the table also gives every nanopali variant's prefill of that text-only prompt. With several
--rounds each round's nanopali / llama.cpp decode ratio is printed too; benchmarks/bench_paired.py keeps the two
loaded side by side and alternates blocks of steps, for a ratio the host's minute-to-minute swings do not move.

Both frameworks load the same checkpoint directory (any size: image tokens and image size come from
its config.json) and get the same inputs: B rows of <image> x N, <bos>, 10 random text ids, "\\n",
random pixels in [-1, 1], all drawn from a fixed seed. Each framework runs in its own subprocess
(this script re-invokes itself with --worker), so peak RSS (ru_maxrss) is per framework and covers
loading and generating. What is timed, identically on both sides, greedy:

    prefill   one forward over the prompt that fills the KV cache and returns the last token's logits
    decode    N single-token cached forwards + argmax, after the prefill; tokens/s = B * N / their time
    generate  the public generate() call for N new tokens, end to end (prefill + N-1 steps + its loop)

Run 0 of each is a warm-up and is dropped; the table shows medians (and bests) over the other runs,
and how much of the CPUs other processes took meanwhile (from /proc/stat): on a shared machine a
busy neighbour slows a run several-fold, so rerun when that row is not near 0.
After each round's workers, the driver measures the machine on the spot: memory read bandwidth (1 GiB
read by torch sums and by plain vector loads, the best), bf16 matmul throughput (2048³ GEMM) and the
vector units' peaks (peaks.py: fp32 FMA, AVX-512 BF16 and VNNI dot products from registers). The
decode bound is that bandwidth divided by the bytes one decode step must read (every decoder
weight and the tied head, in the run's dtype); prefill GFLOP/s counts 2 FLOP per weight per token (decoder and vision tower), and is
given against torch's matmul and the bf16 dot peak (the int8 one for llama.cpp's q8_0 / q4_0).
transformers uses its default attention (reported in the table) and its default DynamicCache;
nanopali uses its static cache. The ratio column is nanopali / transformers.

--device cuda loads both frameworks onto the GPU and waits for it (torch.cuda.synchronize) before
every clock reading. The table adds the decode time per step, the first decode step alone (it
includes nanopali's graph capture), the decode speed of the steps after it, and peak GPU memory
(torch.cuda.max_memory_allocated). The driver then measures the GPU instead of the CPU: HBM
bandwidth (the better of a bf16 torch.sum over 4 GiB, bytes read, and a 4 GiB device-to-device
copy, bytes read + written) and bf16 matmul throughput (8192³ GEMM), each timed with CUDA events.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 10  # random text ids between <bos> and "\n"
NEWLINE = 108       # "\n" in the Gemma tokenizer
QUICK_DIR = Path(tempfile.gettempdir()) / "nanopali-bench-quick"
LLAMACPP = ("llamacpp-bf16", "llamacpp-q8_0", "llamacpp-q4_0")
FRAMEWORKS = ("nanopali", "nanopali-native", "nanopali-loop", "nanopali-plain", "nanopali-int8", "nanopali-int4", "nanopali-eager",
              "nanopali-compile", "nanopali-compile-int8", "transformers", *LLAMACPP)
DEFAULT_FRAMEWORKS = {"cpu": ("nanopali", "nanopali-plain", "nanopali-int8", "nanopali-int4", "transformers"),
                      "cuda": ("nanopali", "nanopali-compile", "nanopali-eager", "nanopali-compile-int8", "transformers")}


# ---------------------------------------------------------------- worker: one framework per process

def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def peak_gpu_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else 0.0


def sync() -> None:
    """Wait for the GPU, if one is in use: its kernels run asynchronously, so clocks are read after this."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make_inputs(config, batch: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The same prompt for both frameworks: long (B, T) ids/masks and (B, 3, S, S) pixels."""
    g = torch.Generator().manual_seed(seed)
    high = min(256000, config.image_token_index, config.text_config.vocab_size)
    ids = torch.cat([
        torch.full((batch, config.num_image_tokens), config.image_token_index),
        torch.full((batch, 1), config.text_config.bos_token_id),
        torch.randint(3, high, (batch, PROMPT_TOKENS), generator=g),
        torch.full((batch, 1), NEWLINE),
    ], 1)
    size = config.vision_config.image_size
    pixels = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    inputs = dict(input_ids=ids, pixel_values=pixels.to(dtype), attention_mask=torch.ones_like(ids),
                  token_type_ids=torch.zeros_like(ids))
    return {k: v.to(device) for k, v in inputs.items()}


class NanoPali:
    def __init__(self, path: str, dtype: torch.dtype, device: str = "cpu", fast: bool = True, quantize: str | None = None,
                 cuda_graphs: bool = True, one_row: str | None = None, compile: bool = False):
        from nanopali import PaliGemma, prepare
        from nanopali.inference.quantize import load_quantized
        if quantize is None:
            self.model = PaliGemma.from_pretrained(path, dtype=dtype, device=device)
        else:  # quantized as it is read, as nanopali.load and the CLI do
            self.model = load_quantized(path, quantize, dtype=dtype, device=device)
        # one_row None: measure which one-row path is faster (the default)
        self.runtime = prepare(self.model, quantize=quantize, cpu_kernels=fast, cuda_graphs=cuda_graphs, force_path=one_row,
                               compile=compile)
        self.attention = "torch SDPA (explicit softmax where Gemma 2 soft-caps)"

    def prefill(self, inputs, new_tokens: int):
        from nanopali.inference.decode import prefill
        logits, state = prefill(self.model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                inputs["token_type_ids"], max_new_tokens=new_tokens, runtime=self.runtime)
        return logits, state

    def step(self, state, tokens):
        return state, state.step(self.model, tokens)

    def text_prefill(self, ids: torch.Tensor) -> None:
        """The prefill of a prompt of text ids alone, no image: what llama.cpp is timed on."""
        from nanopali.inference.decode import prefill
        prefill(self.model, ids, runtime=self.runtime)

    def generate(self, inputs, new_tokens: int) -> torch.Tensor:
        from nanopali import generate
        return generate(self.model, **inputs, max_new_tokens=new_tokens, eos_token_id=[], runtime=self.runtime)


class Transformers:
    def __init__(self, path: str, dtype: torch.dtype, device: str = "cpu"):
        from transformers import PaliGemmaForConditionalGeneration
        self.model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model.generation_config.eos_token_id = None  # never stop early, like eos_token_id=[] in nanopali
        self.attention = self.model.config._attn_implementation

    def prefill(self, inputs, new_tokens: int):
        mask = inputs["attention_mask"]
        out = self.model(**inputs, position_ids=mask.cumsum(-1), use_cache=True, logits_to_keep=1)  # 1-based positions
        return out.logits[:, -1].float(), (out.past_key_values, mask)

    def step(self, state, tokens):
        cache, mask = state
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True),
                         past_key_values=cache, use_cache=True)
        return (out.past_key_values, mask), out.logits[:, -1].float()

    def generate(self, inputs, new_tokens: int) -> torch.Tensor:
        out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return out[:, inputs["input_ids"].shape[1]:]


def text_ids(config, seed: int = 1) -> torch.Tensor:
    """long (1, T): the prompt's length in random text ids (no <image>): llama.cpp's prompt, and nanopali's text-only one."""
    g = torch.Generator().manual_seed(seed)
    T = config.num_image_tokens + 2 + PROMPT_TOKENS
    return torch.randint(3, min(256000, config.image_token_index, config.text_config.vocab_size), (1, T), generator=g)


def timed(fn, *args):
    sync()
    start = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - start


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by all processes on the machine since boot, by this process): Linux /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def other_load(before, after, wall_s: float) -> float:
    """Share of all cores that other processes used between two cpu_seconds() readings: 0 = quiet machine."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / (wall_s * os.cpu_count()))


def llamacpp_worker(args) -> dict:
    """llama.cpp on the GGUF of the checkpoint's language model (converted before, by the driver), the text prompt."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llamacpp

    from nanopali import PaliGemmaConfig
    kind = args.worker.split("-", 1)[1]
    ids = text_ids(PaliGemmaConfig.from_pretrained(args.model))[0].tolist()
    busy, n = [], args.new_tokens
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()

    def log(run, prompt_s, decode_s, wall_s):
        nonlocal cpu_start, wall_start
        busy.append(other_load(cpu_start, cpu_seconds(), time.perf_counter() - wall_start))
        cpu_start, wall_start = cpu_seconds(), time.perf_counter()
        print(f"[{args.worker}] run {run}{' (warm-up)' if run == 0 else ''}: prompt {prompt_s:.3f} s, decode {n} steps "
              f"{decode_s:.3f} s (llama.cpp's counters), other processes {100 * busy[-1]:.0f}% of the CPUs",
              file=sys.stderr, flush=True)

    start = time.perf_counter()
    r = llamacpp.run(llamacpp.gguf_path(Path(args.model), kind), ids, n, args.runs, args.threads, log)
    load_s = time.perf_counter() - start - sum(r["wall_s"])
    timed_runs = slice(1, None)
    prompt_ms, decode_ms = r["prompt_ms"][timed_runs], r["decode_ms"][timed_runs]
    nan = float("nan")
    return dict(
        framework=args.worker, attention=r["attention"], threads=args.threads, load_s=load_s,
        prefill_ms=nan, prefill_best_ms=nan, text_prefill_ms=statistics.median(prompt_ms),
        decode_tok_s=n / (statistics.median(decode_ms) / 1000), decode_best_tok_s=n / (min(decode_ms) / 1000),
        generate_s=statistics.median(r["wall_s"][timed_runs]), other_load_pct=100 * max(busy[timed_runs]),
        rss_after_load_gib=nan, peak_rss_gib=peak_rss_gib(), ms_per_step=statistics.median(decode_ms) / n,
        first_step_ms=nan, later_steps_tok_s=nan, gpu_after_load_gib=0.0, peak_gpu_gib=0.0, cuda_graph=False, compiled=False,
        tokens=r["tokens"], one_row=None)


@torch.no_grad()
def worker(args) -> dict:
    from nanopali import PaliGemmaConfig
    if args.worker.startswith("llamacpp"):
        return llamacpp_worker(args)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(PaliGemmaConfig.from_pretrained(args.model), args.batch, dtype, device=args.device)
    make = {"nanopali": NanoPali, "nanopali-plain": lambda p, d, dev: NanoPali(p, d, dev, fast=False),
            "nanopali-loop": lambda p, d, dev: NanoPali(p, d, dev, one_row="loop"),
            "nanopali-native": lambda p, d, dev: NanoPali(p, d, dev, one_row="native"),
            "nanopali-int8": lambda p, d, dev: NanoPali(p, d, dev, quantize="int8"),
            "nanopali-int4": lambda p, d, dev: NanoPali(p, d, dev, quantize="int4"),
            "nanopali-eager": lambda p, d, dev: NanoPali(p, d, dev, cuda_graphs=False),
            # on the CPU: the plain modules compiled (the CPU kernels cannot be; runtime.check_compile)
            "nanopali-compile": lambda p, d, dev: NanoPali(p, d, dev, compile=True, fast=dev != "cpu"),
            "nanopali-compile-int8": lambda p, d, dev: NanoPali(p, d, dev, quantize="int8", compile=True,
                                                                fast=dev != "cpu"),
            "transformers": Transformers}[args.worker]
    fw, load_s = timed(make, args.model, dtype, args.device)
    rss_after_load, gpu_after_load = peak_rss_gib(), peak_gpu_gib()
    n, prefill_s, decode_s, first_step_s, generate_s, busy = args.new_tokens, [], [], [], [], []
    text = text_ids(PaliGemmaConfig.from_pretrained(args.model)).to(args.device)
    text_prefill_s = []
    for run in range(args.runs + 1):
        cpu_start, wall_start = cpu_seconds(), time.perf_counter()
        if hasattr(fw, "text_prefill") and args.batch == 1:
            text_prefill_s.append(timed(fw.text_prefill, text)[1])
        (logits, state), t = timed(fw.prefill, inputs, n)
        prefill_s.append(t)
        if run == 0 and args.logits_out:
            torch.save(logits[0].float().cpu(), args.logits_out)  # row 0's next-token logits after the prefill
        tokens = [logits.argmax(-1)]
        sync()
        start = time.perf_counter()
        for i in range(n):
            state, logits = fw.step(state, tokens[-1])
            tokens.append(logits.argmax(-1))
            if i == 0:  # the first step alone: it includes nanopali's CUDA graph capture
                sync()
                first_step_s.append(time.perf_counter() - start)
        sync()
        decode_s.append(time.perf_counter() - start)
        generated, t = timed(fw.generate, inputs, n)
        generate_s.append(t)
        if generated.shape[1] != n:
            raise RuntimeError(f"{args.worker} generate() returned {generated.shape[1]} tokens, expected {n}")
        busy.append(other_load(cpu_start, cpu_seconds(), time.perf_counter() - wall_start))
        print(f"[{args.worker}] run {run}{' (warm-up)' if run == 0 else ''}: prefill {prefill_s[-1]:.3f} s, "
              f"decode {n} steps {decode_s[-1]:.3f} s (the first {first_step_s[-1]:.3f}), generate {generate_s[-1]:.3f} s, "
              f"other processes {100 * busy[-1]:.0f}% of the CPUs", file=sys.stderr, flush=True)
    timed_runs = slice(1, None)  # drop the warm-up
    return dict(
        framework=args.worker, attention=fw.attention, threads=torch.get_num_threads(), load_s=load_s,
        prefill_ms=1000 * statistics.median(prefill_s[timed_runs]), prefill_best_ms=1000 * min(prefill_s[timed_runs]),
        text_prefill_ms=1000 * statistics.median(text_prefill_s[timed_runs]) if text_prefill_s else float("nan"),
        decode_tok_s=args.batch * n / statistics.median(decode_s[timed_runs]),
        decode_best_tok_s=args.batch * n / min(decode_s[timed_runs]),
        generate_s=statistics.median(generate_s[timed_runs]), other_load_pct=100 * max(busy[timed_runs]),
        rss_after_load_gib=rss_after_load, peak_rss_gib=peak_rss_gib(),
        ms_per_step=1000 * statistics.median(decode_s[timed_runs]) / n,
        first_step_ms=1000 * statistics.median(first_step_s[timed_runs]),
        later_steps_tok_s=args.batch * (n - 1) / statistics.median(
            [d - f for d, f in zip(decode_s[timed_runs], first_step_s[timed_runs])]) if n > 1 else float("nan"),
        gpu_after_load_gib=gpu_after_load, peak_gpu_gib=peak_gpu_gib(),
        cuda_graph=getattr(state, "graph", None) is not None,  # nanopali's last decode replayed a CUDA graph
        tokens=torch.stack(tokens, 1)[0].tolist(),
        # a compiled step that failed runs eagerly (with a warning), and so does one Dynamo was switched off for
        # (TORCHDYNAMO_DISABLE): say so beside its numbers
        compiled=(hasattr(fw, "runtime") and any(not step.failed for step in fw.runtime.compiled.values())
                  and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0),
        one_row=(one_row_path(fw.runtime.kernels) if args.worker.startswith("nanopali") and args.device == "cpu"
                 and fw.runtime.kernels.enabled else None),
    )


def one_row_path(kernels) -> str:
    """The CPU kernels' one-row path for this model's decode steps: forced, or measured (with the trial steps' medians)."""
    if kernels.forced:
        return f"{kernels.forced} (forced)"
    chooser = kernels.chooser
    trials = ", ".join(f"{p} {1000 * statistics.median(t[1:]):.0f} ms" for p, t in (chooser.times or {}).items()
                       if len(t) > 1)
    return f"{chooser.choice or 'undecided'} (measured; trial steps, median: {trials})"


# ---------------------------------------------------------------- driver: run the workers, print the table

def quick_checkpoint(dtype: str) -> Path:
    """The --quick model: paligemma-3b-224's widths and vocabulary, 2 decoder and 2 vision layers, random weights."""
    out = QUICK_DIR / dtype
    if (out / "config.json").is_file():
        return out
    from dataclasses import replace
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_random_checkpoint import random_state

    from nanopali.io.hf_checkpoint import save_state_dict
    from nanopali.registry import named_config
    config = named_config("paligemma-3b-224")
    config = replace(config, text_config=replace(config.text_config, num_hidden_layers=2, layer_types=config.text_config.layer_types[:2]),
                     vision_config=replace(config.vision_config, num_hidden_layers=2))
    config.save_pretrained(out)
    save_state_dict(random_state(config, getattr(torch, dtype)), out)
    return out


def median_results(runs: list[dict]) -> dict:
    """One result from several rounds: the median of every number, the first round's value of anything else."""
    out = dict(runs[0])
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def gguf_files(model: Path, kinds: list[str], threads: int) -> dict[str, int]:
    """Convert the language model to GGUF once (benchmarks/llamacpp.py, in a subprocess: the driver stays small) and
    return the bytes one decode step reads for each kind."""
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import llamacpp; "
            f"llamacpp.ensure_gguf({str(model)!r}, {kinds!r}, {threads})")
    subprocess.run([sys.executable, "-c", code], check=True)
    sys.path.insert(0, str(here))
    import llamacpp
    return {kind: llamacpp.weight_bytes(llamacpp.gguf_path(model, kind)) for kind in kinds}


def run_worker(framework: str, args, logits_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--model", str(args.model), "--new-tokens", str(args.new_tokens),
           "--runs", str(args.runs), "--threads", str(args.threads), "--batch", str(args.batch), "--dtype", args.dtype,
           "--device", args.device, "--logits-out", str(logits_dir / f"{framework}.pt")]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress and warnings go to stderr
    if proc.returncode != 0:
        print(f"the {framework} worker failed (exit {proc.returncode}); its errors are printed above", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.no_grad()
def measure_machine(threads: int) -> dict:
    """Memory read bandwidth (GB/s: the best of fp32 sum, bf16 sum and fp32 amax over 1 GiB, and peaks.py's plain
    vector loads over 1 GiB), bf16 GEMM throughput (GFLOP/s, 2048³), each the best of 5 repeats, and the vector
    units' peaks (peaks.py)."""
    torch.set_num_threads(threads)
    f32, b16 = torch.ones(2**28), torch.ones(2**29, dtype=torch.bfloat16)
    a, b = torch.randn(2048, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()
    best = lambda fn: (fn(), min(timed(fn)[1] for _ in range(5)))[1]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peaks
    torch_gbs = max(2**30 / best(f32.sum), 2**30 / best(b16.sum), 2**30 / best(f32.amax)) / 1e9
    bandwidth = max(torch_gbs, peaks.read_bandwidth(threads))  # max ignores a NaN second
    return dict(bandwidth_gbs=bandwidth, matmul_gflops=2 * 2048**3 / best(lambda: a @ b) / 1e9,
                **{f"{k}_peak": v for k, v in peaks.measure(threads).items()})


@torch.no_grad()
def measure_gpu() -> dict:
    """HBM bandwidth (GB/s: bf16 sum over 4 GiB, bytes read; 4 GiB copy, bytes read + written) and bf16 GEMM
    throughput (GFLOP/s, 8192³) of the current GPU, each the best of 5 repeats timed with CUDA events."""
    x = torch.ones(2**31, dtype=torch.bfloat16, device="cuda")  # 4 GiB
    y = torch.empty_like(x)
    a, b = (torch.randn(8192, 8192, device="cuda").bfloat16() for _ in range(2))

    def best(fn) -> float:  # seconds
        fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return min(times)

    read, copy = 2**32 / best(x.sum) / 1e9, 2 * 2**32 / best(lambda: y.copy_(x)) / 1e9
    import transformers
    return dict(bandwidth_gbs=max(read, copy), sum_read_gbs=read, copy_gbs=copy,
                matmul_gflops=2 * 8192**3 / best(lambda: a @ b) / 1e9, gpu=torch.cuda.get_device_name(),
                versions=f"torch {torch.__version__}, transformers {transformers.__version__}")


def model_costs(path: Path, dtype: str) -> dict:
    """Bytes one decode step reads (decoder weights + tied head) and prefill FLOPs per prompt, from config.json.
    A mixture-of-experts decoder counts its active weights: k of the E experts per token (batch 1)."""
    from nanopali import PaliGemma, PaliGemmaConfig
    from nanopali.nn.moe import idle_expert_parameters
    config = PaliGemmaConfig.from_pretrained(path)
    with torch.device("meta"):
        model = PaliGemma(config)
    decoder = sum(p.numel() for p in model.decoder.parameters()) - idle_expert_parameters(model.decoder)
    layers = decoder - model.decoder.embed_tokens.weight.numel()
    vision = sum(p.numel() for p in model.vision.parameters())
    T = config.num_image_tokens + 2 + PROMPT_TOKENS
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    # int8: 1 byte per weight (+ tiny scales); int4: half a byte per weight (+ 4 bytes per 128), the head too (its
    # int4 copy; the 64 int8 rows a step recomputes are negligible)
    return dict(decode_bytes={"bf16": decoder * itemsize, "int8": decoder, "int4": decoder // 2 + decoder // 32},
                prefill_flop=2 * (layers * T + vision * config.num_image_tokens), text_prefill_flop=2 * layers * T)


def report(results: dict[str, dict], weight_gib: float, args) -> str:
    rows = [  # (label, key, format)
        ("load (s)", "load_s", "{:.1f}"),
        ("prefill latency (ms), median", "prefill_ms", "{:.0f}"),
        ("prefill latency (ms), best", "prefill_best_ms", "{:.0f}"),
        (f"prefill, text only (ms), median", "text_prefill_ms", "{:.0f}"),
        (f"decode tokens/s (batch {args.batch}), median", "decode_tok_s", "{:.2f}"),
        (f"decode tokens/s (batch {args.batch}), best", "decode_best_tok_s", "{:.2f}"),
        (f"generate {args.new_tokens} tokens (s)", "generate_s", "{:.2f}"),  # llama.cpp: its prefill + steps
        ("peak RSS after load (GiB)", "rss_after_load_gib", "{:.2f}"),
        ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"),
        ("peak RSS / weight bytes", "rss_per_weight", "{:.2f}"),
        ("other processes' CPU share, max (%)", "other_load_pct", "{:.0f}"),
    ]
    if args.device == "cuda":
        rows[5:5] = [
            ("decode ms per step, median", "ms_per_step", "{:.2f}"),
            ("first decode step (ms), median", "first_step_ms", "{:.1f}"),
            ("decode tokens/s after step 1, median", "later_steps_tok_s", "{:.2f}"),
        ]
        rows[-1:-1] = [
            ("peak GPU memory after load (GiB)", "gpu_after_load_gib", "{:.2f}"),
            ("peak GPU memory (GiB)", "peak_gpu_gib", "{:.2f}"),
            ("peak GPU memory / weight bytes", "gpu_per_weight", "{:.2f}"),
        ]
    for r in results.values():
        r["rss_per_weight"] = r["peak_rss_gib"] / weight_gib
        r["gpu_per_weight"] = r.get("peak_gpu_gib", 0.0) / weight_gib
    names = list(results)
    lines = [f"{'':34}" + "".join(f"{n:>16}" for n in names) + (f"{'ratio':>10}" if len(names) == 2 else "")]
    for label, key, fmt in rows:
        cells = [fmt.format(results[n][key]) for n in names]
        a, b = (results[n][key] for n in names[:2]) if len(names) == 2 else (0, 0)
        ratio = f"{a / b:>10.2f}" if b and key != "other_load_pct" else ""
        lines.append(f"{label:34}" + "".join(f"{c:>16}" for c in cells) + ratio)
    lines.append(f"weights: {weight_gib:.2f} GiB on disk; threads: {results[names[0]]['threads']}; dtype: {args.dtype}")
    lines += [f"{n} attention: {results[n]['attention']}" for n in names]
    lines += [f"{n} one-row decode products: {results[n]['one_row']}" for n in names
              if results[n].get("one_row") and n != "nanopali-plain"]
    if args.device == "cuda":
        lines += [f"{n} decode step: {('compiled, ' if results[n]['compiled'] else 'COMPILE FAILED, ') if 'compile' in n else ''}"
                  f"{'CUDA graph replay' if results[n]['cuda_graph'] else 'eager'}" for n in names if n.startswith("nanopali")]
    return "\n".join(lines)


LLAMACPP_RIVAL = {"bf16": "llamacpp-bf16", "int8": "llamacpp-q8_0", "int4": "llamacpp-q4_0"}  # one class each


def precision(name: str) -> str:
    """The weights' kind of a framework: bf16 (or the run's float dtype), int8, int4, or llama.cpp's q8_0 / q4_0."""
    if name.startswith("llamacpp"):
        return name.split("-", 1)[1]
    return name.rsplit("-", 1)[1] if name.endswith(("int8", "int4")) else "bf16"


def round_ratios(rounds: list[dict[str, dict]], failed: list[str]) -> str:
    """Each round's decode ratio of every nanopali variant to its llama.cpp rival, and their median: the workers of
    a round run minutes apart, so this pairs them closer than the ratio of the medians over all rounds does
    (bench_paired.py pairs them within seconds)."""
    lines = []
    for name in rounds[0]:
        rival = LLAMACPP_RIVAL.get(precision(name))
        if not name.startswith("nanopali") or rival not in rounds[0] or {name, rival} & set(failed):
            continue
        ratios = [r[name]["decode_tok_s"] / r[rival]["decode_tok_s"] for r in rounds]
        lines.append(f"{name} / {rival} decode, per round: {', '.join(f'{x:.2f}' for x in ratios)} "
                     f"(median {statistics.median(ratios):.2f}x)")
    return "\n".join(lines)


def summary(results: dict[str, dict], machine: dict, costs: dict, logits_dir: Path, args) -> str:
    """Ratios against transformers, the bandwidth bound, prefill GFLOP/s and agreement with nanopali bf16."""
    bw, gpu, nan = machine["bandwidth_gbs"], args.device == "cuda", float("nan")
    lines = [f"machine, measured now: memory read {bw:.1f} GB/s, bf16 matmul {machine['matmul_gflops']:.0f} GFLOP/s; "
             f"vector peaks (peaks.py): fp32 FMA {machine.get('fp32_fma_peak', nan):.0f}, bf16 dot "
             f"{machine.get('bf16_dot_peak', nan):.0f} GFLOP/s, int8 dot {machine.get('int8_dot_peak', nan):.0f} GOP/s"]
    if gpu:
        lines = [f"GPU, measured now: {machine['gpu']} ({machine['versions']}): HBM {bw:.0f} GB/s (bf16 sum, read: "
                 f"{machine['sum_read_gbs']:.0f}; copy, read + written: {machine['copy_gbs']:.0f}), bf16 matmul "
                 f"{machine['matmul_gflops']:.0f} GFLOP/s"]
    for name, r in results.items():
        kind = precision(name)
        bound = args.batch * bw * 1e9 / costs["decode_bytes"][kind]
        if name.startswith("llamacpp"):  # its prompt is the text-only one: the decoder's FLOPs alone
            gflops = costs["text_prefill_flop"] / (r["text_prefill_ms"] / 1000) / 1e9
        else:
            gflops = costs["prefill_flop"] * args.batch / (r["prefill_ms"] / 1000) / 1e9
        # the instruction its prefill's products can use at best: llama.cpp's q8_0 / q4_0 multiply int8, the rest bf16
        peak = "int8_dot" if kind in ("q8_0", "q4_0") else "bf16_dot"
        line = (f"{name:15s} decode {r['decode_tok_s']:6.2f} tok/s = {100 * r['decode_tok_s'] / bound:3.0f}% of the "
                f"{kind} bound {bound:5.2f} ({costs['decode_bytes'][kind] / 1e9:.2f} GB/token); prefill "
                f"{gflops:4.0f} GFLOP/s = {100 * gflops / machine['matmul_gflops']:3.0f}% of torch's bf16 matmul, "
                f"{100 * gflops / machine.get(f'{peak}_peak', nan):3.0f}% of the {peak.replace('_', ' ')} peak")
        if gpu:
            line += (f"; {r['ms_per_step']:.2f} ms/step; after step 1 {r['later_steps_tok_s']:.2f} tok/s = "
                     f"{100 * r['later_steps_tok_s'] / bound:3.0f}% of the bound")
        if "transformers" in results and name != "transformers" and not name.startswith("llamacpp"):
            tf = results["transformers"]
            line += (f"; vs transformers: decode {r['decode_tok_s'] / tf['decode_tok_s']:.2f}x, "
                     f"prefill latency {r['prefill_ms'] / tf['prefill_ms']:.2f}x, "
                     f"peak RSS {r['peak_rss_gib'] / tf['peak_rss_gib']:.2f}x")
            if gpu:
                line += (f", after step 1 {r['later_steps_tok_s'] / tf['later_steps_tok_s']:.2f}x, "
                         f"peak GPU memory {r['peak_gpu_gib'] / tf['peak_gpu_gib']:.2f}x")
        rival = LLAMACPP_RIVAL.get(kind)
        if name.startswith("nanopali") and rival in results:
            ll = results[rival]
            line += (f"; vs {rival}: decode {r['decode_tok_s'] / ll['decode_tok_s']:.2f}x, "
                     f"text-only prefill latency {r['text_prefill_ms'] / ll['text_prefill_ms']:.2f}x")
        lines.append(line)
    results = {n: r for n, r in results.items() if not n.startswith("llamacpp")}  # no image, other logits
    ref_name = "nanopali" if "nanopali" in results else next(iter(results), None)
    ref_logits = torch.load(logits_dir / f"{ref_name}.pt") if ref_name else None
    for name, r in results.items():
        if name == ref_name:
            continue
        a, b = ref_logits, torch.load(logits_dir / f"{name}.pt")
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()
        x, y = results[ref_name]["tokens"], r["tokens"]
        agree = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        lines.append(f"{name} vs {ref_name}: prefill logits cosine {cos:.5f}; greedy tokens agree for the first "
                     f"{agree} of {len(x)} (row 0)")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--quick", action="store_true", help=f"build (once) and use {QUICK_DIR}: the 3B's widths with 2 "
                   "decoder and 2 vision layers, random weights; implies --runs 2 --new-tokens 8 unless given")
    p.add_argument("--new-tokens", type=int, help="decode steps to time (and generate() length); default 16")
    p.add_argument("--runs", type=int, help="timed runs, after one warm-up run; default 3")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)")
    p.add_argument("--frameworks", help=f"comma-separated subset of {','.join(FRAMEWORKS)} (default: "
                   f"{','.join(DEFAULT_FRAMEWORKS['cpu'])}; on cuda {','.join(DEFAULT_FRAMEWORKS['cuda'])})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both frameworks run")
    p.add_argument("--rounds", type=int, default=1, help="run every framework this many times in turn (fresh "
                   "processes) and report medians over the rounds: contention that drifts hits all of them")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model = args.model or str(quick_checkpoint(args.dtype))
        args.runs, args.new_tokens = args.runs or 2, args.new_tokens or 8
    args.runs, args.new_tokens = args.runs or 3, args.new_tokens or 16
    if not args.model:
        p.error("--model DIR or --quick is required")
    if min(args.new_tokens, args.runs, args.batch, args.threads, args.rounds) < 1:
        p.error("--new-tokens, --runs, --batch, --threads and --rounds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    args.frameworks = args.frameworks or ",".join(DEFAULT_FRAMEWORKS[args.device])
    if args.worker:
        print(json.dumps(worker(args)))
        return
    frameworks = [g for f in args.frameworks.split(",") if f.strip()
                  for g in (LLAMACPP if f.strip() == "llamacpp" else [f.strip()])]
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown or not frameworks:
        p.error(f"--frameworks takes a comma-separated subset of {','.join(FRAMEWORKS)}, got {args.frameworks!r}")
    from nanopali.io.hf_checkpoint import CheckpointError, checkpoint_files
    try:
        weight_gib = sum(f.stat().st_size for f in checkpoint_files(Path(args.model))) / 2**30
    except CheckpointError as e:
        p.error(str(e))
    costs = model_costs(Path(args.model), args.dtype)
    llama = [f for f in frameworks if f.startswith("llamacpp")]
    if llama:
        if args.batch != 1 or args.device != "cpu":
            p.error("llamacpp is timed at batch 1 on the CPU")
        costs["decode_bytes"].update(gguf_files(Path(args.model), [f.split("-", 1)[1] for f in llama], args.threads))
    with tempfile.TemporaryDirectory() as logits_dir:
        rounds, machines = [], []
        for _ in range(args.rounds):  # every framework once per round: a slower spell of the machine hits all
            rounds.append({f: run_worker(f, args, Path(logits_dir)) for f in frameworks})
            # after the workers: Linux carries a parent's peak RSS into its children's ru_maxrss
            machines.append(measure_gpu() if args.device == "cuda" else measure_machine(args.threads))
        failed = [f for f in frameworks if any(r[f] is None for r in rounds)]
        results = {f: median_results([r[f] for r in rounds]) for f in frameworks if f not in failed}
        if not results:
            raise SystemExit(f"every worker failed: {', '.join(failed)}")
        machine = median_results(machines)
        if args.rounds > 1:
            print(f"{args.rounds} rounds; medians over them. Memory read per round (GB/s): "
                  + ", ".join(f"{m['bandwidth_gbs']:.1f}" for m in machines))
        print(report(results, weight_gib, args))
        print(summary(results, machine, costs, Path(logits_dir), args))
        if args.rounds > 1:
            print(round_ratios(rounds, failed))
    if failed:
        print(f"failed (left out of the table): {', '.join(failed)}")
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, weight_gib=weight_gib,
                                             machine=machine, costs=costs, results=results), indent=2))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
