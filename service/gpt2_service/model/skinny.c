/* Products of a few rows with a weight streamed once from memory: out = x @ W.T (+ bias).
 *
 * At one to four rows a linear layer is bound by how fast its weight streams from memory, not by
 * arithmetic. The general kernels (oneDNN, FBGEMM) reach about 70% of this machine's bandwidth
 * there; these loops reach about 95%, which is most of a one-sequence decode step.
 *
 * Each output is reduced in a fixed order that depends only on the weight's shape, never on the
 * number of rows: k ascending with fused multiply-adds, in chunks of `kchunk` (each chunk summed
 * from zero, then added to the running total), the bias added last. skinny.py picks the chunk
 * that makes these loops bitwise equal to the general kernel for the same weight (oneDNN float32
 * sums 512- or 1024-wide chunks, FBGEMM float16 one chunk), and checks it, so a row gets the
 * same bits from either kernel and batch invariance survives the switch between them.
 *
 * The weight is blocked: (N/64, K, 64), N padded with zero columns to a multiple of 64, so a
 * block's 64 outputs read one contiguous stream of K * 64 values. float32 or IEEE half (converted
 * to float32 in registers; the arithmetic is float32). Blocks are shared among OpenMP threads;
 * linked against torch's own libgomp, these are torch's threads, not a second team.
 *
 * Compiled for plain x86-64; the AVX-512 and AVX2 loops are chosen at run time. Elsewhere
 * skinny_supported() returns 0 and skinny.py leaves the general kernels in place.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64

int skinny_supported(void);
void skinny_f32(const float *x, long rows, long k, const float *w, long n, const float *bias, float *out, long kchunk, int threads);
void skinny_f16(const float *x, long rows, long k, const uint16_t *w, long n, const float *bias, float *out, long kchunk, int threads);

#if defined(__x86_64__)
#include <immintrin.h>

static int use_avx512(void)
{
    return __builtin_cpu_supports("avx512f");
}

int skinny_supported(void)
{
    __builtin_cpu_init();
    return use_avx512() || (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"));
}

static void finish(const float *sums, const float *bias, float *out, long ncols)
{
    if (bias) {
        for (long j = 0; j < ncols; j++) out[j] = sums[j] + bias[j];
    } else {
        memcpy(out, sums, (size_t)ncols * sizeof(float));
    }
}

/* One row against one block of 64 outputs; WTYPE and LOAD say how the weight is stored. */
#define AVX512_BLOCK(NAME, WTYPE, LOAD)                                                                  \
    __attribute__((target("avx512f"))) static void NAME(const float *xr, long k, const WTYPE *wb,     \
                                                        long kchunk, float *sums)                      \
    {                                                                                                  \
        __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;                                    \
        for (long k0 = 0; k0 < k; k0 += kchunk) {                                                      \
            long k1 = k0 + kchunk < k ? k0 + kchunk : k;                                               \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                \
            const WTYPE *w = wb + k0 * BLOCK;                                                          \
            for (long i = k0; i < k1; i++, w += BLOCK) {                                               \
                __m512 xv = _mm512_set1_ps(xr[i]);                                                     \
                a0 = _mm512_fmadd_ps(xv, LOAD(w), a0);                                                 \
                a1 = _mm512_fmadd_ps(xv, LOAD(w + 16), a1);                                            \
                a2 = _mm512_fmadd_ps(xv, LOAD(w + 32), a2);                                            \
                a3 = _mm512_fmadd_ps(xv, LOAD(w + 48), a3);                                            \
            }                                                                                          \
            if (k0 == 0) {                                                                             \
                t0 = a0, t1 = a1, t2 = a2, t3 = a3;                                                    \
            } else {                                                                                   \
                t0 = _mm512_add_ps(t0, a0), t1 = _mm512_add_ps(t1, a1);                                \
                t2 = _mm512_add_ps(t2, a2), t3 = _mm512_add_ps(t3, a3);                                \
            }                                                                                          \
        }                                                                                              \
        _mm512_storeu_ps(sums, t0), _mm512_storeu_ps(sums + 16, t1);                                   \
        _mm512_storeu_ps(sums + 32, t2), _mm512_storeu_ps(sums + 48, t3);                              \
    }

/* AVX2 has 16 registers: a block is done as two halves of 32 outputs. */
#define AVX2_BLOCK(NAME, WTYPE, LOAD)                                                                    \
    __attribute__((target("avx2,fma,f16c"))) static void NAME(const float *xr, long k, const WTYPE *wb, \
                                                              long kchunk, float *sums)                \
    {                                                                                                  \
        for (int half = 0; half < 2; half++) {                                                         \
            __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;                                \
            for (long k0 = 0; k0 < k; k0 += kchunk) {                                                  \
                long k1 = k0 + kchunk < k ? k0 + kchunk : k;                                           \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                            \
                const WTYPE *w = wb + k0 * BLOCK + half * 32;                                          \
                for (long i = k0; i < k1; i++, w += BLOCK) {                                           \
                    __m256 xv = _mm256_set1_ps(xr[i]);                                                 \
                    a0 = _mm256_fmadd_ps(xv, LOAD(w), a0);                                             \
                    a1 = _mm256_fmadd_ps(xv, LOAD(w + 8), a1);                                         \
                    a2 = _mm256_fmadd_ps(xv, LOAD(w + 16), a2);                                        \
                    a3 = _mm256_fmadd_ps(xv, LOAD(w + 24), a3);                                        \
                }                                                                                      \
                if (k0 == 0) {                                                                         \
                    t0 = a0, t1 = a1, t2 = a2, t3 = a3;                                                \
                } else {                                                                               \
                    t0 = _mm256_add_ps(t0, a0), t1 = _mm256_add_ps(t1, a1);                            \
                    t2 = _mm256_add_ps(t2, a2), t3 = _mm256_add_ps(t3, a3);                            \
                }                                                                                      \
            }                                                                                          \
            float *s = sums + half * 32;                                                               \
            _mm256_storeu_ps(s, t0), _mm256_storeu_ps(s + 8, t1);                                      \
            _mm256_storeu_ps(s + 16, t2), _mm256_storeu_ps(s + 24, t3);                                \
        }                                                                                              \
    }

#define LOAD512_F32(p) _mm512_loadu_ps(p)
#define LOAD512_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD256_F32(p) _mm256_loadu_ps(p)
#define LOAD256_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))

AVX512_BLOCK(block512_f32, float, LOAD512_F32)
AVX512_BLOCK(block512_f16, uint16_t, LOAD512_F16)
AVX2_BLOCK(block256_f32, float, LOAD256_F32)
AVX2_BLOCK(block256_f16, uint16_t, LOAD256_F16)

#define SKINNY(NAME, WTYPE, B512, B256)                                                                  \
    void NAME(const float *x, long rows, long k, const WTYPE *w, long n, const float *bias, float *out,   \
              long kchunk, int threads)                                                                 \
    {                                                                                                    \
        long blocks = (n + BLOCK - 1) / BLOCK;                                                           \
        int wide = use_avx512();                                                                         \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                \
        for (long b = 0; b < blocks; b++) {                                                              \
            float sums[BLOCK];                                                                           \
            long n0 = b * BLOCK, ncols = n - n0 < BLOCK ? n - n0 : BLOCK;                                \
            for (long r = 0; r < rows; r++) {                                                            \
                if (wide)                                                                                \
                    B512(x + r * k, k, w + b * k * BLOCK, kchunk, sums);                                 \
                else                                                                                     \
                    B256(x + r * k, k, w + b * k * BLOCK, kchunk, sums);                                 \
                finish(sums, bias ? bias + n0 : NULL, out + r * n + n0, ncols);                          \
            }                                                                                            \
        }                                                                                                \
    }

SKINNY(skinny_f32, float, block512_f32, block256_f32)
SKINNY(skinny_f16, uint16_t, block512_f16, block256_f16)

#else /* not x86-64: nothing here; skinny.py keeps the general kernels */

int skinny_supported(void) { return 0; }
void skinny_f32(const float *x, long rows, long k, const float *w, long n, const float *bias, float *out, long kchunk, int threads) {}
void skinny_f16(const float *x, long rows, long k, const uint16_t *w, long n, const float *bias, float *out, long kchunk, int threads) {}

#endif
