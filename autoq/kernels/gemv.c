/* fp32 GEMV (M = 1) over autoq's int8 (per channel or in groups) and int4 weights, for CPUs without native bf16.
 *
 * Decode is memory-bound: reading 1 (int8) or 0.5 (int4) byte per weight instead of 4 is the whole
 * gain, so each kernel streams the quantized rows once, widens them to fp32 in registers and
 * accumulates fp32 FMAs; scales (and int4 zero points) are applied per row / per group.
 * One AVX2+FMA+F16C and one AVX-512 version of each, chosen by the caller (`isa`: 2 = AVX2,
 * 3 = AVX-512, else portable C) so that an AVX2 CPU can be imitated on an AVX-512 one.
 * Rows are split over OpenMP threads; the library links libgomp.so.1, the runtime torch itself
 * loaded, so both share one thread pool. Called from Python with ctypes
 * (autoq/kernels/native.py); the Python module below exists only so that setuptools builds it.
 */
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* ---- int8: y[r] = scale[r] * sum_k q[r, k] * x[k] ---- */

static float dot_int8_c(const float *x, const int8_t *q, int64_t k) {
    float acc = 0.f;
    for (int64_t j = 0; j < k; ++j) acc += (float)q[j] * x[j];
    return acc;
}

__attribute__((target("avx2,fma")))
static float dot_int8_avx2(const float *x, const int8_t *q, int64_t k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {  /* two independent FMA chains */
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j))));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j + 8))));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j + 8), a1);
    }
    __m256 a = _mm256_add_ps(a0, a1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s) + dot_int8_c(x + j, q + j, k - j);
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static float dot_int8_avx512(const float *x, const int8_t *q, int64_t k) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j + 16))));
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j + 16), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + dot_int8_c(x + j, q + j, k - j);
}

void autoq_gemv_int8(const float *x, const int8_t *q, const float *scale, float *y,
                     int64_t n, int64_t k, int isa, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const int8_t *row = q + r * k;
        float d = isa == 3 ? dot_int8_avx512(x, row, k) : isa == 2 ? dot_int8_avx2(x, row, k) : dot_int8_c(x, row, k);
        y[r] = d * scale[r];
    }
}

/* ---- int8 in groups: y[r] = sum_g scale[r, g] * sum_{j in g} q[r, j] * x[j] ----
 * q: int8 [n, k]; scale: fp32 [n, k / group]; the vector versions need group % 32 == 0. The
 * group sums stay in vector registers: one broadcast FMA per group, one reduction per row. */

static float row_int8g_c(const float *x, const int8_t *q, const float *scale, int64_t k, int64_t group) {
    float y = 0.f;
    for (int64_t g = 0; g < k / group; ++g) y += scale[g] * dot_int8_c(x + g * group, q + g * group, group);
    return y;
}

__attribute__((target("avx2,fma")))
static float row_int8g_avx2(const float *x, const int8_t *q, const float *scale, int64_t k, int64_t group) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < k / group; ++g) {
        __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
        for (int64_t j = g * group; j < (g + 1) * group; j += 16) {
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j))));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j + 8))));
            p0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j), p0);
            p1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j + 8), p1);
        }
        acc = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), _mm256_set1_ps(scale[g]), acc);
    }
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static float row_int8g_avx512(const float *x, const int8_t *q, const float *scale, int64_t k, int64_t group) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < k / group; ++g) {
        __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
        for (int64_t j = g * group; j < (g + 1) * group; j += 32) {
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j))));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j + 16))));
            p0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j), p0);
            p1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j + 16), p1);
        }
        acc = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), _mm512_set1_ps(scale[g]), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

void autoq_gemv_int8_groups(const float *x, const int8_t *q, const float *scale, float *y,
                            int64_t n, int64_t k, int64_t group, int isa, int threads) {
    int64_t groups = k / group;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const int8_t *row = q + r * k;
        const float *s = scale + r * groups;
        y[r] = isa == 3 ? row_int8g_avx512(x, row, s, k, group)
             : isa == 2 ? row_int8g_avx2(x, row, s, k, group)
             : row_int8g_c(x, row, s, k, group);
    }
}

/* ---- int4: y[r] = sum_g scale[r, g] * (sum_{j in g} q[r, j] * x[j] - zero_point[r, g] * xsum[g]) ----
 * q: [n, k / 2] bytes, element 2j in the low nibble of byte j; scale: fp16 bits [n, k / group];
 * zero_point: uint8 [n, k / group]; group % 32 == 0. x is split once into its even and odd
 * elements (xe, xo: the low and high nibbles of consecutive bytes then meet consecutive floats)
 * and its sum per group (xsum: the zero point is applied once per group, not per element). */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exponent = (h >> 10) & 31, mantissa = h & 1023;
    uint32_t bits;
    if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa) {  /* subnormal: renormalise */
        exponent = 113;
        while (!(mantissa & 1024)) { mantissa <<= 1; --exponent; }
        bits = sign | (exponent << 23) | ((mantissa & 1023) << 13);
    } else {
        bits = sign;
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

static float row_int4_c(const float *xe, const float *xo, const float *xsum, const uint8_t *q,
                        const uint16_t *scale, const uint8_t *zp, int64_t k, int64_t group) {
    int64_t half = group / 2, groups = k / group;
    float y = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.f;
        for (int64_t b = g * half; b < (g + 1) * half; ++b)
            acc += (float)(q[b] & 15) * xe[b] + (float)(q[b] >> 4) * xo[b];
        y += half_to_float(scale[g]) * (acc - (float)zp[g] * xsum[g]);
    }
    return y;
}

__attribute__((target("avx2,fma,f16c")))
static float row_int4_avx2(const float *xe, const float *xo, const float *xsum, const uint8_t *q,
                           const uint16_t *scale, const uint8_t *zp, int64_t k, int64_t group) {
    int64_t half = group / 2, groups = k / group;
    const __m256i low = _mm256_set1_epi32(15);
    __m256 acc = _mm256_setzero_ps();
    float zero_term = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
        __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
        for (int64_t b = g * half; b < (g + 1) * half; b += 8) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + b)));
            p0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), _mm256_loadu_ps(xe + b), p0);
            p1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xo + b), p1);
        }
        float s = _cvtsh_ss(scale[g]);
        acc = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), _mm256_set1_ps(s), acc);
        zero_term += s * (float)zp[g] * xsum[g];
    }
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t) - zero_term;
}

__attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
static float row_int4_avx512(const float *xe, const float *xo, const float *xsum, const uint8_t *q,
                             const uint16_t *scale, const uint8_t *zp, int64_t k, int64_t group) {
    int64_t half = group / 2, groups = k / group;
    const __m512i low = _mm512_set1_epi32(15);
    __m512 acc = _mm512_setzero_ps();
    float zero_term = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
        __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
        for (int64_t b = g * half; b < (g + 1) * half; b += 16) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + b)));
            p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), _mm512_loadu_ps(xe + b), p0);
            p1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(xo + b), p1);
        }
        float s = _cvtsh_ss(scale[g]);
        acc = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), _mm512_set1_ps(s), acc);
        zero_term += s * (float)zp[g] * xsum[g];
    }
    return _mm512_reduce_add_ps(acc) - zero_term;
}

void autoq_gemv_int4(const float *x, const uint8_t *q, const uint16_t *scale, const uint8_t *zp,
                     float *y, int64_t n, int64_t k, int64_t group, int isa, int threads) {
    int64_t groups = k / group;
    float *xe = (float *)malloc(sizeof(float) * (size_t)(k + groups));  /* xe | xo | xsum */
    if (!xe) return;
    float *xo = xe + k / 2, *xsum = xo + k / 2;
    for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int64_t j = g * group; j < (g + 1) * group; j += 2) {
            xe[j / 2] = x[j];
            xo[j / 2] = x[j + 1];
            s += x[j] + x[j + 1];
        }
        xsum[g] = s;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t *row = q + r * (k / 2);
        const uint16_t *s = scale + r * groups;
        const uint8_t *z = zp + r * groups;
        y[r] = isa == 3 ? row_int4_avx512(xe, xo, xsum, row, s, z, k, group)
             : isa == 2 ? row_int4_avx2(xe, xo, xsum, row, s, z, k, group)
             : row_int4_c(xe, xo, xsum, row, s, z, k, group);
    }
    free(xe);
}

/* ---- dequantization to fp32, one pass (the dequant_fp32 path's chunks) ----
 * Plain loops that GCC vectorises; target_clones adds an AVX2 build picked at load time. */

__attribute__((target_clones("avx2", "default")))
void autoq_dequant_int8(const int8_t *q, const float *scale, float *out, int64_t n, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const float s = scale[r];
        for (int64_t j = 0; j < k; ++j) out[r * k + j] = (float)q[r * k + j] * s;
    }
}

__attribute__((target_clones("avx2", "default")))
void autoq_dequant_int8_groups(const int8_t *q, const float *scale, float *out, int64_t n, int64_t k,
                               int64_t group, int threads) {
    int64_t groups = k / group;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
            const float s = scale[r * groups + g];
            const int8_t *src = q + r * k + g * group;
            float *dst = out + r * k + g * group;
            for (int64_t j = 0; j < group; ++j) dst[j] = (float)src[j] * s;
        }
    }
}

__attribute__((target_clones("avx2", "default")))
void autoq_dequant_int4(const uint8_t *q, const uint16_t *scale, const uint8_t *zp, float *out,
                        int64_t n, int64_t k, int64_t group, int threads) {
    int64_t groups = k / group, half = group / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
            const float s = half_to_float(scale[r * groups + g]);
            const float z = (float)zp[r * groups + g] * s;
            const uint8_t *src = q + r * (k / 2) + g * half;
            float *dst = out + r * k + g * group;
            for (int64_t b = 0; b < half; ++b) {
                dst[2 * b] = (float)(src[b] & 15) * s - z;
                dst[2 * b + 1] = (float)(src[b] >> 4) * s - z;
            }
        }
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gemv",
                                    "autoq's CPU GEMV kernels (called through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__gemv(void) { return PyModule_Create(&module); }
