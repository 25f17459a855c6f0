"""The processor's arithmetic peaks and memory read bandwidth, measured: what bench_generate.py compares prefill
GFLOP/s and decode tokens/s with.

    python benchmarks/peaks.py --threads 2

torch's bf16 GEMM is one kernel's speed, not the machine's; the peak is what the vector units retire when fed from
registers. Timed here, on every thread (OpenMP), 12 independent accumulator chains per thread so latency is hidden:
- fp32 FMA       `vfmadd` (AVX-512): 2 FLOP per lane
- bf16 dot       `vdpbf16ps` (AVX-512 BF16), 2 bf16 products + 2 adds per fp32 lane: what bf16 matmuls can reach
- int8 dot       `vpdpbusd` (AVX-512 VNNI), 4 u8 x s8 products + 4 adds per int32 lane: llama.cpp's q8_0 / q4_0
and memory read bandwidth: 1 GiB summed as 8-byte integers with plain vector loads. Built with the compiler
native.py uses (`native.build`); a missing instruction set gives NaN for that peak.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import time

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>

/* Memory read bandwidth: every 8-byte word of buf summed, rows split between threads (integer adds: no latency chain
   slows the loads). */
extern "C" unsigned long read_words(const unsigned long *buf, long n, int threads) {
    unsigned long s = 0;
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+:s)
    for (long i = 0; i < n; i++) s += buf[i];
    return s;
}

/* On every thread: 12 independent chains a = step(a), `iters` times, in registers; their sum goes to sink[thread] so
   the loop is not dropped. */
template <class V, class Init, class Step, class Sum>
static void chains(long iters, int threads, float *sink, Init init, Step step, Sum sum) {
#pragma omp parallel num_threads(threads)
    {
        V a[12];
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = init(i);
        for (long n = 0; n < iters; n++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) a[i] = step(a[i]);
        }
        float s = 0.0f;
        for (int i = 0; i < 12; i++) s += sum(a[i]);
        sink[omp_get_thread_num()] = s;
    }
}

/* Each returns the ops of one iteration on one thread (0 where the instruction set is missing); `seed` keeps the
   compiler from folding the chains. */
extern "C" long fma_f32(long iters, int threads, float seed, float *sink) {
#if defined(__AVX512F__)
    __m512 x = _mm512_set1_ps(seed), y = _mm512_set1_ps(1.0f - seed);
    chains<__m512>(iters, threads, sink, [](int i) { return _mm512_set1_ps((float)i); },
                   [=](__m512 a) { return _mm512_fmadd_ps(a, x, y); }, [](__m512 a) { return _mm512_reduce_add_ps(a); });
    return 12 * 16 * 2;
#else
    return 0;
#endif
}

extern "C" long dot_bf16(long iters, int threads, float seed, float *sink) {
#if defined(__AVX512BF16__)
    __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(seed), _mm512_set1_ps(seed));
    chains<__m512>(iters, threads, sink, [](int i) { return _mm512_set1_ps((float)i); },
                   [=](__m512 a) { return _mm512_dpbf16_ps(a, x, x); }, [](__m512 a) { return _mm512_reduce_add_ps(a); });
    return 12 * 32 * 2;
#else
    return 0;
#endif
}

extern "C" long dot_int8(long iters, int threads, float seed, float *sink) {
#if defined(__AVX512VNNI__)
    __m512i x = _mm512_set1_epi8((char)(seed * 100)), y = _mm512_set1_epi8(3);
    chains<__m512i>(iters, threads, sink, [](int i) { return _mm512_set1_epi32(i); },
                    [=](__m512i a) { return _mm512_dpbusd_epi32(a, x, y); },
                    [](__m512i a) { return (float)_mm512_reduce_add_epi32(a); });
    return 12 * 64 * 2;
#else
    return 0;
#endif
}
"""
KERNELS = {"fp32_fma": "fma_f32", "bf16_dot": "dot_bf16", "int8_dot": "dot_int8"}


def measure(threads: int, seconds: float = 0.3) -> dict[str, float]:
    """{"fp32_fma", "bf16_dot", "int8_dot"}: the best of 5 timings, in GFLOP/s (GOP/s for int8); NaN where the
    instruction set is missing or the build fails."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nanopali.inference import native
    try:
        lib = native.build(SOURCE, "peaks")
    except Exception:  # no compiler: no peaks
        return {name: math.nan for name in KERNELS}
    sink = (ctypes.c_float * 256)()
    out = {}
    for name, symbol in KERNELS.items():
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = [ctypes.c_long, ctypes.c_int, ctypes.c_float, ctypes.c_void_p], ctypes.c_long
        iters = 1000
        while True:  # calibrate to about `seconds` a call
            start = time.perf_counter()
            ops = fn(iters, threads, 0.5, sink)
            took = time.perf_counter() - start
            if not ops or took > seconds / 4:
                break
            iters *= 4
        best = min(_timed(fn, iters, threads, sink) for _ in range(5)) if ops else math.nan
        out[name] = ops * iters * threads / best / 1e9 if ops else math.nan
    return out


def read_bandwidth(threads: int, gib: int = 1) -> float:
    """GB/s of reading `gib` GiB (far beyond any cache) with plain vector loads on every thread, the best of 5; NaN
    without a compiler. torch's sums (bench_generate.measure_machine) can read slower than a GEMV streams."""
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nanopali.inference import native
    try:
        lib = native.build(SOURCE, "peaks")
    except Exception:
        return math.nan
    lib.read_words.argtypes, lib.read_words.restype = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int], ctypes.c_ulong
    buf = torch.ones(gib * 2**27, dtype=torch.int64)  # touched: its pages exist
    times = []
    for _ in range(6):
        start = time.perf_counter()
        lib.read_words(buf.data_ptr(), buf.numel(), threads)
        times.append(time.perf_counter() - start)
    return gib * 2**30 / min(times[1:]) / 1e9


def _timed(fn, iters: int, threads: int, sink) -> float:
    start = time.perf_counter()
    fn(iters, threads, 0.5, sink)
    return time.perf_counter() - start


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(f"memory read {read_bandwidth(args.threads):8.1f} GB/s on {args.threads} thread(s)")
    for name, value in measure(args.threads).items():
        print(f"{name:9s} {value:8.1f} G{'OP' if name == 'int8_dot' else 'FLOP'}/s on {args.threads} thread(s)")
