"""Hand-written one-row products for decoding on the CPU (and an int4 unpacking for prefill), compiled for this
processor at first use.

    y = native.gemv(x, weight, scale=None)   # x (1, K) @ weight (N, K)ᵀ [· scale (N,)] -> fp32 (1, N), or None
    y = native.gemv_int4(x, packed, scales_and_zeros, block)   # x (1, K) @ torch's packed int4 weight -> fp32 (1, N)
    ok = native.dequantize_int4(packed, scales_and_zeros, block, out)   # that weight in bf16 -> out (N, K)
    out = native.attend_one_row(q, k, v, mask, scale, softcap)   # a decode step's attention; also rms_norm, geglu
    out = native.decode_layer(native.layer(...), x, cos, sin, k_cache, v_cache, slots, mask)  # a whole layer's step

A decode step reads every weight once for one row of activations, so it runs at the speed weights stream
from memory. Three products are written here, in C++ with the processor's vector instructions, as llama.cpp
does them (BENCHMARKS.md measures them against torch's kernels and llama.cpp):
- bf16 weights · bf16 x: dot products of bf16 pairs accumulated in fp32 (AVX-512 BF16 `vdpbf16ps`; on AVX2 the
  pairs widened to fp32 by a shift and a mask, and fused multiply-adds; elsewhere the compiler's loop).
- int8 weights · int8 x ("W8A8", llama.cpp's q8_0 way): x is quantized on the fly in blocks of 32 (one scale
  each: max|x| / 127), int8 products summed in int32 per block (AVX-512 VNNI `vpdpbusd` on |x| and the weight
  with x's sign; on AVX2 `vpmaddubsw` + `vpmaddwd`, llama.cpp's way; elsewhere the compiler's loop), scaled per
  block in fp32, then by the weight's row scale. The weights must lie in [-127, 127] (quantize.py's range).
- int4 weights (torch's CPU packing, read in place) · int8 x ("W4A8", llama.cpp's q4_0 · q8_0 way): x quantized
  as above, nibble pairs of two columns interleaved so `vpmaddubsw` multiplies them with two x at once (AVX-512
  VBMI `vpermb` on a whole 64-row block; on AVX2 32 rows at a time), the group's scale and zero applied after.
- a decode step's other work on small tensors, where eager torch spends most of its time launching ops: attention
  of one query row per head over the KV cache (150 us a layer of the 3B in torch, 8 ops; one pass here), RMSNorm
  and GeGLU, all in fp32 and rounded once (cpu_kernels.CpuKernels.attention / rms_norm / gelu choose them).
- a whole dense decoder layer's decode step for one row (decode_layer): the norms, the seven products of any of
  the three kinds, RoPE, the cache write, attention and GeGLU in one call, rounded to bf16 where the per-op path
  rounds, so its result is that path's bit for bit; Python's ~20 calls a layer cost 4-6 ms a step of the 3B.
Rows are split between torch's OpenMP threads (the library links the libgomp torch loaded). It builds once per
source, compiler and processor into ~/.cache/nanopali (or $NANOPALI_CACHE) with the C++ compiler torch's
inductor uses (`cpp_kernels.py`'s loop needs one too) and `-march=native`; if that fails, `available()` is False,
a warning says why once, and the callers take torch's kernels. Which path a model's decode steps take is measured
(cpu_kernels.StepChooser).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import threading
import warnings
from pathlib import Path

import torch

BLOCK = 32  # activations per int8 scale (llama.cpp's q8_0 block)
# -ffp-contract=off: a multiply and an add written apart stay apart (dequantize_int4 rounds as torch does); the
# kernels' fused multiply-adds are written as such
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define SHORT_BF16_ROW 4096  /* elements */

static inline float bf16_to_float(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* fp32 -> bf16, rounded to nearest even as torch's .to(torch.bfloat16) does (NaN stays NaN). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* element i of an array of bf16 (`bf16`) or fp32 values, as fp32; and storing one */
static inline float load_at(const void *p, int bf16, long i) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_at(void *p, int bf16, long i, float f) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(f); else ((float *)p)[i] = f;
}

#if defined(__AVX2__)
/* Rows of up to this many bytes are short: the hardware prefetcher, which follows each row, stops at its end, so the
   AVX2 loops prefetch the next 4 rows themselves (+10-20 % at 4 KiB rows; -7 % at 32 KiB rows, hence only short). */
#define SHORT_ROW 8192
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* y[n] = sum_k x[k] w[n, k], bf16 inputs, fp32 accumulation; 4 weight rows at a time share each load of x;
   rows split between threads. */
extern "C" void gemv_bf16(const uint16_t *x, const uint16_t *w, float *y, long N, long K, int threads) {
#if defined(__AVX512BF16__)
    if (K <= SHORT_BF16_ROW) {
        /* short rows each on their own, start to end: one stream the hardware prefetcher follows, where four rows at
           once are four short ones (as gemv_w8a8's one-row case) */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long n = 0; n < N; n++) {
            const uint16_t *r = w + n * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            long k = 0;
            for (; k + 64 <= K; k += 64) {
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
            }
            float a = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            for (; k < K; k++) a += bf16_to_float(r[k]) * bf16_to_float(x[k]);
            y[n] = a;
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n0 = 0; n0 < N; n0 += 4) {
        long rows = N - n0 < 4 ? N - n0 : 4, k = 0;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(__AVX512BF16__)
        if (rows == 4) {
            const uint16_t *r0 = w + n0 * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            for (; k + 32 <= K; k += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r0 + k), xv);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r1 + k), xv);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r2 + k), xv);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r3 + k), xv);
            }
            acc[0] = _mm512_reduce_add_ps(a0); acc[1] = _mm512_reduce_add_ps(a1);
            acc[2] = _mm512_reduce_add_ps(a2); acc[3] = _mm512_reduce_add_ps(a3);
        }
#elif defined(__AVX2__) && defined(__FMA__)
        if (rows == 4) {
            /* 16 bf16 in a 256-bit register are 8 fp32 lanes of pairs: the even ones widen by a shift, the odd ones by
               masking the low half, and x is split the same way, so even·even + odd·odd sums every product. */
            const uint16_t *r[4] = {w + n0 * K, w + (n0 + 1) * K, w + (n0 + 2) * K, w + (n0 + 3) * K};
            const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000);
            const long ahead = K <= SHORT_ROW / 2 ? 4 * K : 0;  /* short rows: fetch the next 4 rows' (measured) */
            __m256 ae[4], ao[4];
            for (int i = 0; i < 4; i++) { ae[i] = _mm256_setzero_ps(); ao[i] = _mm256_setzero_ps(); }
            for (; k + 16 <= K; k += 16) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
                __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16)), xo = _mm256_castsi256_ps(_mm256_and_si256(xv, hi));
                for (int i = 0; i < 4; i++) {
                    if (ahead) _mm_prefetch((const char *)(r[i] + ahead + k), _MM_HINT_T0);
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(r[i] + k));
                    ae[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), xe, ae[i]);
                    ao[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wv, hi)), xo, ao[i]);
                }
            }
            for (int i = 0; i < 4; i++) acc[i] = hsum256(_mm256_add_ps(ae[i], ao[i]));
        }
#endif
        for (long r = 0; r < rows; r++) {
            const uint16_t *row = w + (n0 + r) * K;
            float a = acc[r];
            /* no `omp simd` here: inside the parallel loop it cost the whole kernel 15-20 % of its stream (35-40 -> 43-48
               GB/s at K = 2048 on a Zen 4 reading 47-50 GB/s, BENCHMARKS.md) although this tail never runs there */
            for (long j = k; j < K; j++) a += bf16_to_float(row[j]) * bf16_to_float(x[j]);
            y[n0 + r] = a;
        }
    }
}

/* x (K,) fp32 -> int8 q (K,) and one scale per block of 32 (max|x| / 127), spread per 4-byte lane: lane_scale[K / 4]. */
static void quantize_x(const float *x, int8_t *q, float *lane_scale, long K) {
    long b = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    /* the same arithmetic 32 at a time: x · inv rounded to nearest even (the default mode, as lrintf) */
    for (; b + 32 <= K; b += 32) {
        __m512 v0 = _mm512_loadu_ps(x + b), v1 = _mm512_loadu_ps(x + b + 16);
        float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float s = m / 127.0f, inv = m > 0.0f ? 127.0f / m : 0.0f;
        __m512 iv = _mm512_set1_ps(inv);
        _mm_storeu_si128((__m128i *)(q + b), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, iv))));
        _mm_storeu_si128((__m128i *)(q + b + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, iv))));
        _mm256_storeu_ps(lane_scale + b / 4, _mm256_set1_ps(s));
    }
#endif
    for (; b < K; b += 32) {
        float m = 0.0f;
        for (long j = b; j < b + 32; j++) m = fmaxf(m, fabsf(x[j]));
        float s = m / 127.0f, inv = m > 0.0f ? 127.0f / m : 0.0f;
        for (long j = b; j < b + 32; j++) q[j] = (int8_t)lrintf(x[j] * inv);
        for (long j = b / 4; j < (b + 32) / 4; j++) lane_scale[j] = s;
    }
}

/* acc[r] = sum_b xscale_b * sum_{k in b} q_x[k] w[r][k] for `rows` (1..4) weight rows, which share each load of x
   (K % 32 == 0). */
static inline void dot_w8a8(const int8_t *const *w, long rows, const int8_t *xq, const float *lane_scale, long K,
                            float *acc) {
    long k = 0;
    for (long r = 0; r < rows; r++) acc[r] = 0.0f;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (rows == 4) {
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (; k + 64 <= K; k += 64) {
            __m512i xv = _mm512_loadu_si512(xq + k);
            __mmask64 neg = _mm512_movepi8_mask(xv);                          /* x < 0 */
            __m512i ax = _mm512_abs_epi8(xv);                                 /* |x| as u8 */
            __m512 ls = _mm512_loadu_ps(lane_scale + k / 4);
            for (int r = 0; r < 4; r++) {
                __m512i wv = _mm512_loadu_si512(w[r] + k);
                __m512i sw = _mm512_mask_sub_epi8(wv, neg, _mm512_setzero_si512(), wv);   /* w with x's sign */
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sw);         /* 16 sums of 4 products */
                a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), ls, a[r]);
            }
        }
        for (int r = 0; r < 4; r++) acc[r] = _mm512_reduce_add_ps(a[r]);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (rows == 4) {
        /* llama.cpp's AVX2 q8_0 dot: |x| (u8) times w with x's sign (s8), pairs summed to s16 (no overflow: the
           weights are in [-127, 127]), then to s32 by a multiply-add with ones; one block of 32 a register. */
        const __m256i ones = _mm256_set1_epi16(1);
        const long ahead = K <= SHORT_ROW ? 4 * K : 0;
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (; k + 32 <= K; k += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
            __m256i ax = _mm256_sign_epi8(xv, xv);
            __m256 ls = _mm256_loadu_ps(lane_scale + k / 4);
            for (int r = 0; r < 4; r++) {
                if (ahead) _mm_prefetch((const char *)(w[r] + ahead + k), _MM_HINT_T0);
                __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(w[r] + k)), xv);
                __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), ones);
                a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), ls, a[r]);
            }
        }
        for (int r = 0; r < 4; r++) acc[r] = hsum256(a[r]);
    }
#endif
    for (long r = 0; r < rows; r++)
        for (long b = k; b < K; b += 32) {
            int32_t s = 0;
#pragma omp simd reduction(+:s)
            for (long j = b; j < b + 32; j++) s += (int32_t)w[r][j] * (int32_t)xq[j];
            acc[r] += (float)s * lane_scale[b / 4];
        }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define BLOCK_SCALES 4096  /* x's block scales row_w8a8<true> takes from the stack: K up to 131072 */
/* Σ_b xscale_b Σ_{k in b} q_x[k] r[k] for one weight row r: x's scale per 4-byte lane from lane_scale, or
   (BLOCKS) per block of 32 from bs, two to a register by a permute. */
template <bool BLOCKS>
static inline float row_w8a8(const int8_t *r, const int8_t *xq, const float *lane_scale, const float *bs, long K) {
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    long k = 0;
    for (; k + 64 <= K; k += 64) {  /* two accumulators, alternating: two fused multiply-add chains */
        /* 8 KiB ahead in the stream (rows are contiguous): 36 -> 40 and 51 -> 57 GB/s from memory on Zen 5
           (2 threads, A/B); 2 KiB gained nothing, 12-32 KiB the same as 8. The bf16 and int4 loops gain
           nothing from more than they have. */
        _mm_prefetch((const char *)(r + k) + 8192, _MM_HINT_T0);
        __m512i xv = _mm512_loadu_si512(xq + k), wv = _mm512_loadu_si512(r + k);
        __m512i sw = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xv), _mm512_setzero_si512(), wv);
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(xv), sw);
        __m512 ls = BLOCKS ? _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(
                                 _mm_castpd_ps(_mm_load_sd((const double *)(bs + k / 32)))))
                           : _mm512_loadu_ps(lane_scale + k / 4);
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), ls, a0);
        __m512 t = a0; a0 = a1; a1 = t;
    }
    const int8_t *rest = r + k;
    float tail;  /* the last 32 columns, if K % 64: dot_w8a8's loop for one row */
    dot_w8a8(&rest, 1, xq + k, lane_scale + k / 4, K - k, &tail);
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + tail;
}
#endif

/* y[m, n] = wscale[n] * sum_b xscale_{m,b} * sum_{k in b} q_x[m, k] w[n, k] for M rows of x (M, K) fp32, quantized
   here into xq (M, K) and lane_scale (M, K / 4); each weight row is read once for all M rows. */
extern "C" void gemv_w8a8(const float *x, const int8_t *w, const float *wscale, float *y, long M, long N, long K,
                          int8_t *xq, float *lane_scale, int threads) {
    for (long m = 0; m < M; m++) quantize_x(x + m * K, xq + m * K, lane_scale + m * (K / 4), K);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (M == 1) {
        /* One row of x: each weight row on its own, start to end. Four rows at once are four short streams (2 KiB
           each at K = 2048), which the hardware prefetcher follows worse than one: 32 -> 40 GB/s on Zen 5, A/B.
           Long rows take x's scales one per block of 32 (row_w8a8<true>): the lane scales take K bytes, as many as
           xq, and the 2 K bytes re-read for every row fell out of L1 beside the weight stream at K = 16384 (+11-13 %
           from memory there, A/B); short rows keep the lane scales, one load (-6 to -15 % in cache the other way). */
        if (K > 4096 && K / 32 <= BLOCK_SCALES) {
            float bs[BLOCK_SCALES];
            for (long b = 0; b < K / 32; b++) bs[b] = lane_scale[b * 8];
#pragma omp parallel for num_threads(threads) schedule(static)
            for (long n = 0; n < N; n++) y[n] = row_w8a8<true>(w + n * K, xq, lane_scale, bs, K) * wscale[n];
        } else {
#pragma omp parallel for num_threads(threads) schedule(static)
            for (long n = 0; n < N; n++) y[n] = row_w8a8<false>(w + n * K, xq, lane_scale, nullptr, K) * wscale[n];
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n0 = 0; n0 < N; n0 += 4) {
        long rows = N - n0 < 4 ? N - n0 : 4;
        const int8_t *rp[4];
        float acc[4];
        for (long r = 0; r < rows; r++) rp[r] = w + (n0 + r) * K;
        for (long m = 0; m < M; m++) {
            dot_w8a8(rp, rows, xq + m * K, lane_scale + m * (K / 4), K, acc);
            for (long r = 0; r < rows; r++) y[m * N + n0 + r] = acc[r] * wscale[n0 + r];
        }
    }
}

/* int4 weights as torch's CPU packing lays them out (cpu_kernels.unpack_int4 documents it): blocks of B rows, each
   column a run of B/2 bytes whose low nibbles are rows 0..B/2-1 and high nibbles rows B/2..B-1; the last N % B rows
   one run of (N % B)/2 bytes a column, even rows low, odd rows high. w[n, k] = (q - 8) s[g, n] + z[g, n] for the group
   g of G columns, s and z interleaved in sz (K/G, N, 2), fp32 or bf16 (sz_bf16). */
static inline int q4_at(const uint8_t *packed, long N, long K, long B, long n, long k) {
    long full = N - N % B;
    if (n < full) {
        long r = n % B, half = B / 2;
        uint8_t byte = packed[(n / B) * B * K / 2 + k * half + r % half];
        return r < half ? byte & 15 : byte >> 4;
    }
    long r = n - full;
    uint8_t byte = packed[full * K / 2 + k * ((N - full) / 2) + r / 2];
    return r % 2 ? byte >> 4 : byte & 15;
}

/* (x[k], x[k+1]) as one 16-bit lane, x[k] in the low byte: their order in memory, so one broadcast load. */
static inline short pair_at(const int8_t *p) { short v; memcpy(&v, p, 2); return v; }

/* Σ_k w[n, k] x[k] = Σ_g s·Σ_{k in g} q x + (z - 8 s)·Σ_{k in g} x: the first sum on x rounded to int8 per block of 32
   (q4_0 · q8_0, llama.cpp's way), the second on the unrounded x (gsum). One row n, scalar: the tail rows, and every
   row where AVX2 is missing. */
static void int4_rows_scalar(const uint8_t *packed, const void *sz, int sz_bf16, long N, long K, long G, long B,
                             const int8_t *xq, const float *lane_scale, const float *gsum, long n, float *y) {
    float total = 0.0f;
    for (long g = 0; g < K / G; g++) {
        float part = 0.0f;
        for (long b = g * G; b < (g + 1) * G; b += 32) {
            int32_t d = 0;
            for (long k = b; k < b + 32; k++) d += q4_at(packed, N, K, B, n, k) * (int32_t)xq[k];
            part += (float)d * lane_scale[b / 4];
        }
        float s = load_at(sz, sz_bf16, (g * N + n) * 2), z = load_at(sz, sz_bf16, (g * N + n) * 2 + 1);
        total += part * s + (z - 8.0f * s) * gsum[g];
    }
    y[n] = total;
}

#if defined(__AVX2__) && defined(__FMA__)
/* 32 rows at once: 16 bytes of every column's run in a block of B rows (rows r0..r0+15 in the low nibbles, r0+B/2..
   in the high ones). Two columns k, k+1 are interleaved byte by byte (a permute and a shuffle), so each 16-bit lane
   holds one row's pair of nibbles and `vpmaddubsw` with the pair (x[k], x[k+1]) gives q[k] x[k] + q[k+1] x[k+1];
   16 columns are summed in 16 bits (at most 8 · 2 · 15 · 127 = 30480), then widened. */
static void int4_unit(const uint8_t *base, long half, const void *sz, int sz_bf16, long N, long K, long G,
                      const int8_t *xq, const float *lane_scale, const float *gsum, long r0, float *y) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i pairs = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                           0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    float total[32] = {0.0f}, part[32];
    for (long g = 0; g < K / G; g++) {
        if (g + 1 < K / G) {  /* the next group's scales and zeros of both runs of 16 rows (as in int4_block64) */
            const char *next = (const char *)sz + ((g + 1) * N + r0) * 2 * (sz_bf16 ? 2 : 4);
            for (int c = 0; c < (sz_bf16 ? 64 : 128); c += 64) {
                _mm_prefetch(next + c, _MM_HINT_T0);
                _mm_prefetch(next + half * 2 * (sz_bf16 ? 2 : 4) + c, _MM_HINT_T0);
            }
        }
        __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (long b = g * G; b < (g + 1) * G; b += 32) {
            __m256i d[4];
            for (int j = 0; j < 4; j++) d[j] = _mm256_setzero_si256();
            for (long h = b; h < b + 32; h += 16) {
                __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
                for (long k = h; k < h + 16; k += 2) {
                    const uint8_t *p = base + k * half;
                    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
                                                        _mm_loadu_si128((const __m128i *)(p + half)), 1);
                    v = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(v, 0xD8), pairs);  /* rows 0..15, (k, k+1) */
                    __m256i xp = _mm256_set1_epi16(pair_at(xq + k));
                    lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(v, m4), xp));
                    hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), xp));
                }
                d[0] = _mm256_add_epi32(d[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo)));
                d[1] = _mm256_add_epi32(d[1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1)));
                d[2] = _mm256_add_epi32(d[2], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi)));
                d[3] = _mm256_add_epi32(d[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1)));
            }
            __m256 xs = _mm256_set1_ps(lane_scale[b / 4]);
            for (int j = 0; j < 4; j++) f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[j]), xs, f[j]);
        }
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(part + 8 * j, f[j]);
        for (int r = 0; r < 32; r++) {
            long n = r0 + (r < 16 ? r : half + r - 16), i = (g * N + n) * 2;
            float s = load_at(sz, sz_bf16, i), z = load_at(sz, sz_bf16, i + 1);
            total[r] += part[r] * s + (z - 8.0f * s) * gsum[g];
        }
    }
    for (int r = 0; r < 32; r++) y[r0 + (r < 16 ? r : half + r - 16)] = total[r];
}
#endif

#if defined(__AVX512F__)
/* The scales and zeros of 16 consecutive rows, from their interleaved (s, z) pairs at sz + i (fp32 or bf16): each
   pair is a 32-bit lane (bf16) split by a shift and a mask, or two vectors of pairs split by two permutes (fp32). */
static inline void sz16(const void *sz, int sz_bf16, long i, __m512 *s, __m512 *z) {
    if (sz_bf16) {
        __m512i v = _mm512_loadu_si512((const uint16_t *)sz + i);
        *s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        *z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)));
    } else {
        __m512 a = _mm512_loadu_ps((const float *)sz + i), c = _mm512_loadu_ps((const float *)sz + i + 16);
        *s = _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), c);
        *z = _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), c);
    }
}
#endif

#if defined(__AVX512VBMI__) && defined(__AVX512BW__) && defined(__AVX512F__)
/* A whole block of B = 64 rows (torch's packing where AVX-512 is): columns k and k+1 are 64 contiguous bytes, one
   load; `vpermb` interleaves them byte by byte so that each 16-bit lane holds one row's pair of nibbles (rows 0..31 in
   the low nibbles, 32..63 in the high ones), and `vpmaddubsw` with the pair (x[k], x[k+1]) gives q[k] x[k] +
   q[k+1] x[k+1], as int4_unit does with half the width. The scales and zeros of the 64 rows are applied as vectors
   (sz16). */
static void int4_block64(const uint8_t *base, const void *sz, int sz_bf16, long N, long K, long G, const int8_t *xq,
                         const float *lane_scale, const float *gsum, long r0, float *y) {
    static const uint8_t order[64] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42,
        11, 43, 12, 44, 13, 45, 14, 46, 15, 47, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55, 24, 56,
        25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i m4 = _mm512_set1_epi8(15), pairs = _mm512_loadu_si512(order);
    __m512 total[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (long g = 0; g < K / G; g++) {
        if (g + 1 < K / G) {  /* the next group's scales and zeros, N rows past these: no hardware prefetcher follows
                                 that stride, and each group's loads waited on memory. +6-10 % from memory (Zen 5, A/B) */
            const char *next = (const char *)sz + ((g + 1) * N + r0) * 2 * (sz_bf16 ? 2 : 4);
            for (int c = 0; c < (sz_bf16 ? 256 : 512); c += 64) _mm_prefetch(next + c, _MM_HINT_T0);
        }
        __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (long b = g * G; b < (g + 1) * G; b += 32) {
            __m512i d[4];
            for (int j = 0; j < 4; j++) d[j] = _mm512_setzero_si512();
            for (long h = b; h < b + 32; h += 16) {
                __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
                for (long k = h; k < h + 16; k += 2) {
                    /* 4 KiB ahead in the block's stream: +10 % from memory on Zen 5 (31 -> 34 GB/s, 2 threads;
                       2 and 8 KiB less), where the hardware prefetcher alone left the loads waiting */
                    _mm_prefetch((const char *)(base + k * 32 + 4096), _MM_HINT_T0);
                    __m512i v = _mm512_permutexvar_epi8(pairs, _mm512_loadu_si512(base + k * 32));
                    __m512i xp = _mm512_set1_epi16(pair_at(xq + k));
                    lo = _mm512_add_epi16(lo, _mm512_maddubs_epi16(_mm512_and_si512(v, m4), xp));
                    hi = _mm512_add_epi16(hi, _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), xp));
                }
                d[0] = _mm512_add_epi32(d[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(lo)));
                d[1] = _mm512_add_epi32(d[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(lo, 1)));
                d[2] = _mm512_add_epi32(d[2], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(hi)));
                d[3] = _mm512_add_epi32(d[3], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(hi, 1)));
            }
            __m512 xs = _mm512_set1_ps(lane_scale[b / 4]);
            for (int j = 0; j < 4; j++) f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[j]), xs, f[j]);
        }
        __m512 gs = _mm512_set1_ps(gsum[g]), eight = _mm512_set1_ps(8.0f);
        for (int j = 0; j < 4; j++) {
            __m512 s, z;
            sz16(sz, sz_bf16, (g * N + r0 + 16 * j) * 2, &s, &z);  /* rows r0 + 16 j .. + 15 */
            total[j] = _mm512_fmadd_ps(f[j], s, _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, s, z), gs, total[j]));
        }
    }
    for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + r0 + 16 * j, total[j]);
}
#endif

/* y (N,) = x (K,) fp32 · the int4 weight (N, K)ᵀ; K and G multiples of 32, B/2 a multiple of 16. Scratch: xq (K,),
   lane_scale (K / 4,), gsum (K / G,). */
extern "C" void gemv_int4(const float *x, const uint8_t *packed, const void *sz, int sz_bf16, float *y, long N,
                          long K, long G, long B, int8_t *xq, float *lane_scale, float *gsum, int threads) {
    quantize_x(x, xq, lane_scale, K);
    for (long g = 0; g < K / G; g++) {
        float t = 0.0f;
#pragma omp simd reduction(+:t)
        for (long k = g * G; k < (g + 1) * G; k++) t += x[k];
        gsum[g] = t;
    }
    long full = N - N % B, half = B / 2, vector_rows = 0;  /* rows done by a vector kernel: whole blocks */
#if defined(__AVX512VBMI__) && defined(__AVX512BW__) && defined(__AVX512F__)
    if (B == 64) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long blk = 0; blk < full / 64; blk++)
            int4_block64(packed + blk * 64 * K / 2, sz, sz_bf16, N, K, G, xq, lane_scale, gsum, blk * 64, y);
        vector_rows = full;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (vector_rows == 0) {
        long per_block = half / 16;                               /* 32-row units in a block */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long u = 0; u < full / 32; u++) {
            long blk = u / per_block, c = u % per_block;
            int4_unit(packed + blk * B * K / 2 + 16 * c, half, sz, sz_bf16, N, K, G, xq, lane_scale, gsum,
                      blk * B + 16 * c, y);
        }
        vector_rows = full;
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = vector_rows; n < N; n++)
        int4_rows_scalar(packed, sz, sz_bf16, N, K, G, B, xq, lane_scale, gsum, n, y);
}

/* A decode step's attention, one query row per (batch row b, head h) against its kv head's S cache slots, in fp32:
   out[b, h] = softmax_j(cap(q[b, h] · k[b, g, j] · scale) where mask[b, j], -inf elsewhere) · v[b, g, :], g = h / (H / KV),
   cap(s) = tanh(s / softcap) · softcap when softcap > 0. q (B, H, D), k and v (B, KV, S, D) and out (B, H, D) in
   bf16 (`bf16`) or fp32; mask (B, S) bytes, 1 = may attend (a row with none gets NaN); scratch: B · H · (S + D) floats.
   The (b, h) pairs are split between threads. */
extern "C" void attend_one_row(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int bf16,
                               long B, long H, long KV, long S, long D, float scale, float softcap, float *scratch,
                               int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bh = 0; bh < B * H; bh++) {
        long b = bh / H, g = (bh % H) / (H / KV);
        float *sc = scratch + bh * (S + D), *acc = sc + S, top = -INFINITY, total = 0.0f;
        for (long d = 0; d < D; d++) acc[d] = load_at(q, bf16, bh * D + d);    /* q, then the output */
        for (long j = 0; j < S; j++) {
            if (!mask[b * S + j]) { sc[j] = -INFINITY; continue; }
            long row = ((b * KV + g) * S + j) * D;
            float dot = 0.0f;
#pragma omp simd reduction(+:dot)
            for (long d = 0; d < D; d++) dot += acc[d] * load_at(k, bf16, row + d);
            float s = dot * scale;
            if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
            sc[j] = s;
            top = s > top ? s : top;
        }
        for (long j = 0; j < S; j++) { sc[j] = sc[j] == -INFINITY ? 0.0f : expf(sc[j] - top); total += sc[j]; }
        for (long d = 0; d < D; d++) acc[d] = 0.0f;
        for (long j = 0; j < S; j++) {
            if (sc[j] == 0.0f) continue;
            long row = ((b * KV + g) * S + j) * D;
            float p = sc[j] / total;
#pragma omp simd
            for (long d = 0; d < D; d++) acc[d] += p * load_at(v, bf16, row + d);
        }
        float none = total > 0.0f ? 1.0f : NAN;  /* a row that may attend to nothing: NaN, as the explicit path */
        for (long d = 0; d < D; d++) store_at(out, bf16, bh * D + d, acc[d] * none);
    }
}

/* Gemma's RMSNorm of M rows of D: out = x · rsqrt(mean(x²) + eps) · (1 + w) in fp32, rounded once; x, w and out each
   bf16 or fp32 (flags). */
extern "C" void rms_norm_rows(const void *x, int x_bf16, const void *w, int w_bf16, void *out, long M, long D,
                              float eps) {
    for (long m = 0; m < M; m++) {
        float ss = 0.0f;
#pragma omp simd reduction(+:ss)
        for (long d = 0; d < D; d++) { float t = load_at(x, x_bf16, m * D + d); ss += t * t; }
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (long d = 0; d < D; d++)
            store_at(out, x_bf16, m * D + d, load_at(x, x_bf16, m * D + d) * r * (1.0f + load_at(w, w_bf16, d)));
    }
}

#if defined(__AVX512F__)
/* e^x, 16 at a time: 2^n · 2^f with n = round(x log2 e), |f| <= 1/2, 2^f by its Taylor polynomial of degree 6
   (relative error <= 1.3e-7, about an fp32 ulp); x clamped to [-87, 87]. libm's expf is not vectorised here. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(87.0f)), _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
    const float c[7] = {1.0f, 0.6931471805599453f, 0.2402265069591007f, 0.0555041086648216f, 0.0096181291076285f,
                        0.0013333558146428f, 0.0001540353039338f};
    __m512 p = _mm512_set1_ps(c[6]);
    for (int i = 5; i >= 0; i--) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}
#endif

/* out = gelu_tanh(gate) · up for n elements, in fp32, rounded once; bf16 or fp32 (all three alike). gelu_tanh(x) =
   x · sigmoid(2 √(2/π) (x + 0.044715 x³)), as cpu_kernels._gelu_sigmoid writes it. 16 at a time
   with AVX-512 (BF16 for the rounding), else one at a time with libm's expf. */
extern "C" int geglu_vectorised(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;  /* one expf at a time: slower than eager torch's two ops (58 against 25 us on the 3B's 16384) */
#endif
}

extern "C" void geglu(const void *gate, const void *up, void *out, long n, int bf16) {
    long i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    const __m512 k = _mm512_set1_ps(-1.5957691216057308f), c = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 x, u;
        if (bf16) {
            x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)gate + i))), 16));
            u = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)up + i))), 16));
        } else {
            x = _mm512_loadu_ps((const float *)gate + i);
            u = _mm512_loadu_ps((const float *)up + i);
        }
        __m512 z = _mm512_mul_ps(k, _mm512_add_ps(x, _mm512_mul_ps(c, _mm512_mul_ps(x, _mm512_mul_ps(x, x)))));
        __m512 y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, exp16(z))), u);
        if (bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), (__m256i)_mm512_cvtneps_pbh(y));
        else _mm512_storeu_ps((float *)out + i, y);
    }
#endif
    for (; i < n; i++) {
        float x = load_at(gate, bf16, i);
        float y = x / (1.0f + expf(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
        store_at(out, bf16, i, y * load_at(up, bf16, i));
    }
}

/* out (N, K) bf16 = the int4 weight, w[n, k] = (q - 8) s + z (same layout and scales as gemv_int4), for a prefill's
   bf16 GEMM: torch's int4 kernel multiplies 268 rows at a third of the bf16 GEMM's rate, and unpacking with tensor ops
   costs more than the product. Row-major, as F.linear takes it: the GEMM on a transposed (K, N) weight, which a
   block's 128-byte columns made easier to write, was 15-20 % slower (BENCHMARKS.md).
   Per 64-row block and 32 columns, the 32 x 32 bytes of the columns' runs are transposed with `vpermt2b`: the
   1024 bytes' index bits (column c4..c0, row r4..r0) are exchanged between the register number and the byte
   position one pair at a time, so each register ends up holding rows 2i and 2i + 1 (low nibbles; 32 + 2i and
   33 + 2i in the high ones) for the 32 columns. Returns 0 (nothing written) where AVX-512 VBMI / BF16 are missing
   or blocks are not 64 rows or K and G not multiples of 32. */
extern "C" int dequantize_int4(const uint8_t *packed, const void *sz, int sz_bf16, uint16_t *out, long N, long K,
                                    long G, long B, int threads) {
#if defined(__AVX512VBMI__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (B != 64 || N % 64 || K % 32 || G % 32) return 0;
    /* stage t exchanges register bit 3 - t with byte bit 4 - t; lo / hi: the indices making the pair's two results */
    uint8_t lo[4][64], hi[4][64];
    for (int t = 0; t < 4; t++)
        for (int b = 0; b < 64; b++) {
            int q = 1 << (4 - t), clear = b & ~q;
            lo[t][b] = (uint8_t)(b & q ? 64 + clear : b);
            hi[t][b] = (uint8_t)(b & q ? 64 + b : b | q);
        }
    uint8_t last[64];  /* byte bits (c0 c4 c3 c2 c1 r0) -> (r0 c4 c3 c2 c1 c0): swap bits 5 and 0 */
    for (int b = 0; b < 64; b++) last[b] = (uint8_t)((b & 0x1E) | ((b >> 5) & 1) | ((b & 1) << 5));
    const __m512i m4 = _mm512_set1_epi8(15), order = _mm512_loadu_si512(last);
    const __m512 eight = _mm512_set1_ps(8.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long blk = 0; blk < N / 64; blk++) {
        const uint8_t *base = packed + blk * 64 * K / 2;
        for (long k0 = 0; k0 < K; k0 += 32) {
            __m512i R[16];
            for (int j = 0; j < 16; j++) R[j] = _mm512_loadu_si512(base + (k0 + 2 * j) * 32);
            for (int t = 0; t < 4; t++) {
                const __m512i il = _mm512_loadu_si512(lo[t]), ih = _mm512_loadu_si512(hi[t]);
                int p = 1 << (3 - t);
                for (int j = 0; j < 16; j++) {
                    if (j & p) continue;
                    __m512i a = R[j], b = R[j | p];
                    R[j] = _mm512_permutex2var_epi8(a, il, b);
                    R[j | p] = _mm512_permutex2var_epi8(a, ih, b);
                }
            }
            long g = k0 / G;
            for (int i = 0; i < 16; i++) {
                __m512i v = _mm512_permutexvar_epi8(order, R[i]);         /* rows 2i, 2i + 1: 32 columns each */
                __m512i nib[2] = {_mm512_and_si512(v, m4), _mm512_and_si512(_mm512_srli_epi16(v, 4), m4)};
                for (int h = 0; h < 2; h++)
                    for (int half = 0; half < 2; half++) {
                        long n = blk * 64 + 32 * h + 2 * i + half;
                        __m256i bytes = half ? _mm512_extracti64x4_epi64(nib[h], 1) : _mm512_castsi512_si256(nib[h]);
                        __m512 s = _mm512_set1_ps(load_at(sz, sz_bf16, (g * N + n) * 2));
                        __m512 z = _mm512_set1_ps(load_at(sz, sz_bf16, (g * N + n) * 2 + 1));
                        __m512 w0 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes))), eight);
                        __m512 w1 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1))), eight);
                        w0 = _mm512_add_ps(_mm512_mul_ps(w0, s), z);
                        w1 = _mm512_add_ps(_mm512_mul_ps(w1, s), z);
                        _mm512_storeu_si512(out + n * K + k0, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
                    }
            }
        }
    }
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- a whole decoder layer, one row */

/* One product's weight as decode_layer reads it: kind 0 bf16 (N, K); 1 int8 (N, K) with fp32 row scales `scale`;
   2 int4 in torch's packing (B rows a block) with (K / G, N, 2) scales and zeros `sz` (bf16 if sz_bf16, else fp32). */
struct Weight { long kind, N, K, G, B, sz_bf16; const void *w; const float *scale; const void *sz; };

/* One dense Gemma layer: projections q, k, v, o, gate, up, down; norms before attention, after it (Gemma 2, else
   NULL), before the MLP and after it (Gemma 2, else NULL), each bf16 or fp32 (norm_bf16). */
struct Layer {
    struct Weight proj[7];
    const void *norm[4];
    long norm_bf16[4];
    long D, H, KV, Dh, I;
    float eps, scale, softcap;
};

/* decode_layer's scratch, carved from one buffer; with base 0 only the size is computed */
struct Scratch { float *xf, *yf, *lane, *gsum, *att; uint16_t *h, *q, *k, *v, *a, *gate, *up; int8_t *xq; };

static long carve(const struct Layer *L, long S, uintptr_t base, struct Scratch *s) {
    long wide = L->D > L->I ? L->D : L->I, off = 0;
    if (L->H * L->Dh > wide) wide = L->H * L->Dh;
#define TAKE(field, type, n) s->field = (type *)(base + off); off += ((long)((n) * sizeof(type)) + 63) & ~63L
    TAKE(xf, float, wide); TAKE(yf, float, wide); TAKE(lane, float, wide / 4); TAKE(gsum, float, wide / 32 + 1);
    TAKE(att, float, L->H * (S + L->Dh)); TAKE(h, uint16_t, wide); TAKE(q, uint16_t, L->H * L->Dh);
    TAKE(k, uint16_t, L->KV * L->Dh); TAKE(v, uint16_t, L->KV * L->Dh); TAKE(a, uint16_t, L->H * L->Dh);
    TAKE(gate, uint16_t, L->I); TAKE(up, uint16_t, L->I); TAKE(xq, int8_t, wide);
#undef TAKE
    return off;
}

extern "C" long decode_layer_scratch(const struct Layer *L, long S) { struct Scratch s; return carve(L, S, 0, &s); }

/* fp32 -> bf16 for n values (round to nearest even) */
static void round_bf16(const float *y, uint16_t *out, long n) {
    long i = 0;
#if defined(__AVX512BF16__)
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(y + i)));
#endif
    for (; i < n; i++) out[i] = float_to_bf16(y[i]);
}

/* out (N,) bf16 = x (K,) bf16 · W, by the one-row kernel of W's kind, the fp32 result rounded once (as the per-op
   path: cpu_kernels' native products, then .to(bf16)) */
static void product(const struct Weight *W, const uint16_t *x, uint16_t *out, const struct Scratch *s, int threads) {
    if (W->kind == 0) {
        gemv_bf16(x, (const uint16_t *)W->w, s->yf, W->N, W->K, threads);
    } else {
        for (long k = 0; k < W->K; k++) s->xf[k] = bf16_to_float(x[k]);
        if (W->kind == 1)
            gemv_w8a8(s->xf, (const int8_t *)W->w, W->scale, s->yf, 1, W->N, W->K, s->xq, s->lane, threads);
        else
            gemv_int4(s->xf, (const uint8_t *)W->w, W->sz, (int)W->sz_bf16, s->yf, W->N, W->K, W->G, W->B, s->xq,
                      s->lane, s->gsum, threads);
    }
    round_bf16(s->yf, out, W->N);
}

/* nn/rope.apply_rope on `rows` heads of Dh in bf16, each op rounded as torch rounds it: x·cos, rotate(x)·sin, their sum */
static void rope_rows(uint16_t *x, long rows, long Dh, const uint16_t *cos, const uint16_t *sin) {
    long half = Dh / 2;
    for (long r = 0; r < rows; r++) {
        uint16_t *h = x + r * Dh, out[Dh];
        for (long i = 0; i < Dh; i++) {
            float rot = i < half ? -bf16_to_float(h[i + half]) : bf16_to_float(h[i - half]);
            float a = bf16_to_float(float_to_bf16(bf16_to_float(h[i]) * bf16_to_float(cos[i])));
            float b = bf16_to_float(float_to_bf16(rot * bf16_to_float(sin[i])));
            out[i] = float_to_bf16(a + b);
        }
        memcpy(h, out, sizeof(out));
    }
}

/* x + h for n bf16 values, rounded (torch's bf16 add) */
static void add_bf16(const uint16_t *x, const uint16_t *h, uint16_t *out, long n) {
    for (long i = 0; i < n; i++) out[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(h[i]));
}

/* One dense Gemma decoder layer for one row (models/gemma.GemmaDecoderLayer.forward with the native per-op kernels,
   rounded at the same places): x (D,) bf16 -> out (D,) bf16; the row's k and v are written at cache slot *slot of
   this layer's k and v caches (KV, S, Dh) bf16; mask (S,) bytes; cos and sin (Dh,) bf16. Returns 0, or 1 (nothing
   done) if the slot is outside the cache. */
extern "C" int decode_layer(const struct Layer *L, const uint16_t *x, uint16_t *out, const uint16_t *cos,
                            const uint16_t *sin, uint16_t *kc, uint16_t *vc, long S, const long *slot,
                            const uint8_t *mask, void *scratch, int threads) {
    if (*slot < 0 || *slot >= S) return 1;
    struct Scratch s;
    carve(L, S, (uintptr_t)scratch, &s);
    long D = L->D, Dh = L->Dh, KV = L->KV;
    rms_norm_rows(x, 1, L->norm[0], (int)L->norm_bf16[0], s.h, 1, D, L->eps);
    product(&L->proj[0], s.h, s.q, &s, threads);
    product(&L->proj[1], s.h, s.k, &s, threads);
    product(&L->proj[2], s.h, s.v, &s, threads);
    rope_rows(s.q, L->H, Dh, cos, sin);
    rope_rows(s.k, KV, Dh, cos, sin);
    for (long g = 0; g < KV; g++) {
        memcpy(kc + (g * S + *slot) * Dh, s.k + g * Dh, Dh * sizeof(uint16_t));
        memcpy(vc + (g * S + *slot) * Dh, s.v + g * Dh, Dh * sizeof(uint16_t));
    }
    attend_one_row(s.q, kc, vc, mask, s.a, 1, 1, L->H, KV, S, Dh, L->scale, L->softcap, s.att, threads);
    product(&L->proj[3], s.a, s.h, &s, threads);
    if (L->norm[1]) rms_norm_rows(s.h, 1, L->norm[1], (int)L->norm_bf16[1], s.h, 1, D, L->eps);
    add_bf16(x, s.h, out, D);
    rms_norm_rows(out, 1, L->norm[2], (int)L->norm_bf16[2], s.h, 1, D, L->eps);
    product(&L->proj[4], s.h, s.gate, &s, threads);
    product(&L->proj[5], s.h, s.up, &s, threads);
    geglu(s.gate, s.up, s.gate, L->I, 1);
    product(&L->proj[6], s.gate, s.h, &s, threads);
    if (L->norm[3]) rms_norm_rows(s.h, 1, L->norm[3], (int)L->norm_bf16[3], s.h, 1, D, L->eps);
    add_bf16(out, s.h, out, D);
    return 0;
}
"""


def _compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return get_cpp_compiler()
    except Exception:  # a torch without it: the usual name
        return os.environ.get("CXX", "g++")


def _cache_dir() -> Path:
    return Path(os.environ.get("NANOPALI_CACHE", Path.home() / ".cache" / "nanopali"))


def build(source: str, name: str = "native") -> ctypes.CDLL:
    """Compile C++ `source` for this processor (FLAGS) once per source, flags, compiler and processor, into the cache,
    and load it; OSError or CalledProcessError if that fails."""
    compiler = _compiler()
    cpu = Path("/proc/cpuinfo").read_text().split("\nflags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    key = hashlib.sha256("\0".join([source, compiler, cpu, torch.__version__, *FLAGS]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"{name}-{key}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        src, tmp = lib.with_suffix(".cpp"), lib.with_suffix(f".{os.getpid()}.tmp")
        src.write_text(source)
        subprocess.run([compiler, *FLAGS, str(src), "-o", str(tmp)], check=True, capture_output=True, text=True)
        tmp.rename(lib)
    return ctypes.CDLL(str(lib))  # its libgomp.so.1 is the one torch loaded: one OpenMP thread pool


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels, built at first use; None, with a warning, if that fails."""
    try:
        dll = build(SOURCE)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"nanopali.inference.native: building the CPU kernels with {_compiler()} failed "
                      f"({detail.strip()[:300]}); using torch's kernels", RuntimeWarning, stacklevel=3)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    dll.gemv_bf16.argtypes = [p, p, p, i64, i64, i32]
    dll.gemv_w8a8.argtypes = [p, p, p, p, i64, i64, i64, p, p, i32]
    dll.gemv_int4.argtypes = [p, p, p, i32, p, i64, i64, i64, i64, p, p, p, i32]
    dll.dequantize_int4.argtypes = [p, p, i32, p, i64, i64, i64, i64, i32]
    f32 = ctypes.c_float
    dll.attend_one_row.argtypes = [p, p, p, p, p, i32, i64, i64, i64, i64, i64, f32, f32, p, i32]
    dll.rms_norm_rows.argtypes = [p, i32, p, i32, p, i64, i64, f32]
    dll.geglu.argtypes = [p, p, p, i64, i32]
    dll.geglu_vectorised.restype = i32
    dll.decode_layer_scratch.argtypes, dll.decode_layer_scratch.restype = [p, i64], i64
    dll.decode_layer.argtypes = [p, p, p, p, p, p, p, i64, p, p, p, i32]
    dll.decode_layer.restype = i32
    return dll


def available() -> bool:
    return _library() is not None


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv(x, weight) has a kernel here: x (M, K) with one row for bf16 weights (bf16 x), any M for int8
    weights (bf16 or fp32 x) with K % 32 == 0; contiguous CPU weights."""
    K = weight.shape[-1]
    if x.numel() % K or not weight.is_contiguous() or weight.device.type != "cpu":
        return False
    return ((weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.numel() == K)
            or (weight.dtype == torch.int8 and K % BLOCK == 0 and x.dtype in (torch.bfloat16, torch.float32)))


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (M, K) · weight (N, K)ᵀ [· scale (N,)] -> fp32 (M, N); None when no kernel takes it (see `takes`)."""
    lib = _library()
    if lib is None or not takes(x, weight):
        return None
    N, K = weight.shape
    M = x.numel() // K
    y = torch.empty(M, N, dtype=torch.float32)
    threads = torch.get_num_threads()
    if weight.dtype == torch.bfloat16:
        x = x.contiguous()
        lib.gemv_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), N, K, threads)
    else:
        xf = x.float().contiguous()
        scratch = torch.empty(2 * M * K, dtype=torch.uint8)  # int8 x (M, K), then its lane scales (fp32 (M, K / 4))
        s = scale.float().contiguous()
        lib.gemv_w8a8(xf.data_ptr(), weight.data_ptr(), s.data_ptr(), y.data_ptr(), M, N, K, scratch.data_ptr(),
                      scratch.data_ptr() + M * K, threads)
    return y


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, block: int) -> torch.Tensor | None:
    """One row x (1, K) · the int4 weight in torch's CPU packing (uint8 (N, K / 2), `block` rows per packing block:
    cpu_kernels.int4_block()) with its (K / G, N, 2) scales and zeros -> fp32 (1, N); None when no kernel takes it
    (no build, more than one row, K or G not a multiple of 32)."""
    lib = _library()
    N, K, G, sz = _int4_shapes(packed, scales_and_zeros)
    if lib is None or x.numel() != K or K % BLOCK or G % BLOCK or block % 32 or packed.device.type != "cpu":
        return None
    xf, y = x.float().contiguous(), torch.empty(1, N, dtype=torch.float32)
    scratch = torch.empty(K + 4 * (K // 4) + 4 * (K // G), dtype=torch.uint8)  # int8 x, its lane scales, group sums
    base = scratch.data_ptr()
    lib.gemv_int4(xf.data_ptr(), packed.contiguous().data_ptr(), sz.data_ptr(), int(sz.dtype == torch.bfloat16),
                  y.data_ptr(), N, K, G, block, base, base + K, base + K + 4 * (K // 4), torch.get_num_threads())
    return y


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, block: int, out: torch.Tensor) -> bool:
    """Write the int4 weight in torch's CPU packing (as gemv_int4 takes it) in bf16 to out (N, K): out[n, k] = (q - 8) ·
    scale + zero, equal bit for bit to cpu_kernels.dequantize_int4's. False, with out untouched, where no kernel takes
    it: no build, no AVX-512 VBMI and BF16, blocks not of 64 rows, K or the group not a multiple of 32."""
    lib = _library()
    N, K, G, sz = _int4_shapes(packed, scales_and_zeros)
    if lib is None or out.dtype != torch.bfloat16 or out.shape != (N, K) or not out.is_contiguous():
        return False
    return bool(lib.dequantize_int4(packed.contiguous().data_ptr(), sz.data_ptr(), int(sz.dtype == torch.bfloat16),
                                    out.data_ptr(), N, K, G, block, torch.get_num_threads()))


def _int4_shapes(packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[int, int, int, torch.Tensor]:
    """N, K and the group size G of a packed int4 weight, and its scales and zeros as the kernels read them
    (contiguous, fp32 or bf16)."""
    groups, N, _ = scales_and_zeros.shape
    K = packed.numel() * 2 // N
    sz = scales_and_zeros if scales_and_zeros.dtype in (torch.float32, torch.bfloat16) else scales_and_zeros.float()
    return N, K, K // groups, sz.contiguous()


FLOATS = (torch.float32, torch.bfloat16)  # what the elementwise kernels and attend_one_row take


def attend_one_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                   softcap: float | None) -> torch.Tensor | None:
    """One query row per head: q (B, H, 1, D), the cache's k, v (B, KV, S, D), bool mask (B, 1, 1, S) -> (B, H, 1, D)
    in q's dtype, computed in fp32 (nn.attention's explicit path); None where no kernel takes it (no build, other
    dtypes or shapes, a row that may attend to nothing)."""
    lib = _library()
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    if (lib is None or T != 1 or q.dtype not in FLOATS or k.dtype != q.dtype or v.dtype != q.dtype or H % KV
            or k.shape != (B, KV, S, D) or v.shape != k.shape or mask.shape != (B, 1, 1, S) or mask.dtype != torch.bool):
        return None
    mask = mask.reshape(B, S).contiguous()
    if not mask.any(-1).all():
        return None  # softmax of nothing: the explicit path's NaN, not an invented answer
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    scratch = torch.empty(B * H * (S + D), dtype=torch.float32)
    lib.attend_one_row(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
                       int(q.dtype == torch.bfloat16), B, H, KV, S, D, scale, softcap or 0.0, scratch.data_ptr(),
                       torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """nn.norms.rms_norm of x (..., D) in one pass (fp32 arithmetic, rounded once); None where no kernel takes it."""
    lib = _library()
    if lib is None or x.dtype not in FLOATS or weight.dtype not in FLOATS or weight.shape != x.shape[-1:]:
        return None
    x, weight = x.contiguous(), weight.detach().contiguous()
    out = torch.empty_like(x)
    lib.rms_norm_rows(x.data_ptr(), int(x.dtype == torch.bfloat16), weight.data_ptr(),
                      int(weight.dtype == torch.bfloat16), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """gelu_tanh(gate) · up in fp32, rounded once; None where no kernel takes it (no build, no AVX-512 BF16 to
    vectorise it, mixed or other dtypes)."""
    lib = _library()
    if (lib is None or not lib.geglu_vectorised() or gate.dtype not in FLOATS or up.dtype != gate.dtype
            or up.shape != gate.shape):
        return None
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    lib.geglu(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), int(gate.dtype == torch.bfloat16))
    return out


# ------------------------------------------------------------------ a whole decoder layer, one row


class Weight(ctypes.Structure):
    """One product's weight for decode_layer (the C struct of the same name): see bf16_weight / int8_weight /
    int4_weight. `tensors` holds what its pointers point into, alive as long as it is."""
    _fields_ = [("kind", ctypes.c_long), ("N", ctypes.c_long), ("K", ctypes.c_long), ("G", ctypes.c_long),
                ("B", ctypes.c_long), ("sz_bf16", ctypes.c_long), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("sz", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    """One dense decoder layer for decode_layer: its seven weights, four norms (NULL where Gemma 1 has none) and sizes;
    `tensors` keeps every tensor it points into alive (the C array holds copies of the Weights, not the Python objects)."""
    _fields_ = [("proj", Weight * 7), ("norm", ctypes.c_void_p * 4), ("norm_bf16", ctypes.c_long * 4),
                ("D", ctypes.c_long), ("H", ctypes.c_long), ("KV", ctypes.c_long), ("Dh", ctypes.c_long),
                ("I", ctypes.c_long), ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("softcap", ctypes.c_float)]


def bf16_weight(weight: torch.Tensor) -> Weight | None:
    """A bf16 (N, K) weight as decode_layer reads it (gemv's kernel); None where that kernel does not take it."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous() or weight.device.type != "cpu":
        return None
    return _holding(Weight(0, *weight.shape, 0, 0, 0, weight.data_ptr(), None, None), weight)


def int8_weight(weight: torch.Tensor, scale: torch.Tensor) -> Weight | None:
    """An int8 (N, K) weight with fp32 row scales (N,), for the W8A8 kernel; None where it does not take it."""
    N, K = weight.shape
    if (weight.dtype != torch.int8 or K % BLOCK or not weight.is_contiguous() or weight.device.type != "cpu"
            or scale.dtype != torch.float32 or scale.shape != (N,) or not scale.is_contiguous()):
        return None
    return _holding(Weight(1, N, K, 0, 0, 0, weight.data_ptr(), scale.data_ptr(), None), weight, scale)


def int4_weight(packed: torch.Tensor, scales_and_zeros: torch.Tensor, block: int) -> Weight | None:
    """A packed int4 weight (as gemv_int4 takes it) for decode_layer; None where gemv_int4 would not take it."""
    N, K, G, sz = _int4_shapes(packed, scales_and_zeros)
    if K % BLOCK or G % BLOCK or block % 32 or packed.device.type != "cpu" or not packed.is_contiguous():
        return None
    return _holding(Weight(2, N, K, G, block, int(sz.dtype == torch.bfloat16), packed.data_ptr(), None, sz.data_ptr()),
                    packed, sz)


def _holding(struct: ctypes.Structure, *tensors: torch.Tensor) -> ctypes.Structure:
    """struct, keeping `tensors` (what its pointers point into) alive with it."""
    struct.tensors = tensors
    return struct


def layer(weights: list[Weight], norms: list[torch.Tensor | None], heads: int, kv_heads: int, head_dim: int, eps: float,
          scale: float, softcap: float | None) -> Layer | None:
    """The Layer for decode_layer from its seven weights (q, k, v, o, gate, up, down), its four norms' weights (before
    attention, after it or None, before the MLP, after it or None) and its attention's sizes; None where the shapes do
    not chain or a norm's dtype is neither bf16 nor fp32."""
    D, I = weights[0].K, weights[4].N
    shapes = [(heads * head_dim, D), (kv_heads * head_dim, D), (kv_heads * head_dim, D), (D, heads * head_dim),
              (I, D), (I, D), (D, I)]
    if ([(w.N, w.K) for w in weights] != shapes or head_dim % 2 or heads % kv_heads
            or any(n is not None and (n.dtype not in FLOATS or n.shape != (D,) or not n.is_contiguous()) for n in norms)):
        return None
    spec = Layer((Weight * 7)(*weights), (ctypes.c_void_p * 4)(*[None if n is None else n.data_ptr() for n in norms]),
                 (ctypes.c_long * 4)(*[int(n is not None and n.dtype == torch.bfloat16) for n in norms]),
                 D, heads, kv_heads, head_dim, I, eps, scale, softcap or 0.0)
    return _holding(spec, *[t for w in weights for t in w.tensors], *[n for n in norms if n is not None])


def decode_layer(spec: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """One decode step of a dense decoder layer for one row, as one call: x (1, 1, D) bf16 -> (1, 1, D) bf16, writing
    the row's k and v at cache slot slots[0] of this layer's caches (1, KV, S, Dh) bf16; cos, sin (1, 1, 1, Dh) bf16
    and the bool mask (1, 1, 1, S). `spec` (native.layer's) reads its weights as they were when it was made. None
    where it does not apply (no build, other dtypes or shapes)."""
    lib = _library()
    S, Dh = k_cache.shape[-2:]
    if (lib is None or x.dtype != torch.bfloat16 or x.numel() != spec.D or k_cache.dtype != torch.bfloat16
            or k_cache.shape != (1, spec.KV, S, spec.Dh) or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or cos.shape != (1, 1, 1, Dh)
            or sin.shape != cos.shape or cos.dtype != torch.bfloat16 or sin.dtype != torch.bfloat16
            or mask.shape != (1, 1, 1, S) or mask.dtype != torch.bool or slots.shape != (1,)
            or slots.dtype != torch.long):
        return None
    x, cos, sin, mask = x.contiguous(), cos.contiguous(), sin.contiguous(), mask.contiguous()
    out = torch.empty_like(x)
    scratch = _scratch(lib.decode_layer_scratch(ctypes.byref(spec), S))
    if lib.decode_layer(ctypes.byref(spec), x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                        k_cache.data_ptr(), v_cache.data_ptr(), S, slots.data_ptr(), mask.data_ptr(),
                        scratch.data_ptr(), torch.get_num_threads()):
        raise IndexError(f"cache slot {int(slots[0])} is outside the cache's {S} slots")
    return out


_local = threading.local()


def _scratch(size: int) -> torch.Tensor:
    """A per-thread byte buffer of at least `size` bytes, reused between calls."""
    buffer = getattr(_local, "scratch", None)
    if buffer is None or buffer.numel() < size:
        buffer = _local.scratch = torch.empty(size, dtype=torch.uint8)
    return buffer
