/* A decode step's products, out = x @ W.T (+ bias), with the weight streamed once from memory per
 * tile of rows; a decode step's attention (skinny_attend, below), layer norm and GELU; and every
 * block of a decode step in one call (skinny_decode_layers, at the end).
 *
 * At a few rows a linear layer is bound by how fast its weight streams from memory, not by
 * arithmetic. The general kernels (oneDNN, FBGEMM) reach 60-70% of this machine's bandwidth
 * there; these loops read faster than torch sums 1 GiB, by reading several blocks of the weight
 * side by side (one to three rows, AVX-512: side512, below). Over a few dozen rows (tiles of six
 * rows) the bound is how fast the next weights arrive while the arithmetic runs; they are fetched
 * ahead, in four streams.
 *
 * float32 and float16: each output is reduced in a fixed order that depends only on the weight's
 * shape, never on the number of rows: k ascending with fused multiply-adds, in chunks of `kchunk`
 * (each chunk summed from zero, then added to the running total), the bias added last. int8
 * (below): exact integer sums and FBGEMM's roundings. skinny.py picks the chunk (or rounding
 * variant) that makes these loops bitwise equal to the general kernel for the same weight
 * (oneDNN float32 sums 512- or 1024-wide chunks, FBGEMM float16 one chunk), and checks it, so a
 * row gets the same bits from either kernel and batch invariance survives the switch.
 *
 * float weights are blocked (N/64, K, 64), N padded with zero columns to a multiple of 64, so a
 * block's 64 outputs read one contiguous stream of K * 64 values: float32, or IEEE half converted
 * to float32 in registers. Blocks are shared among OpenMP threads; linked against torch's own
 * libgomp, these are torch's threads, not a second team.
 *
 * Compiled for plain x86-64; the AVX-512 and AVX2 loops are chosen at run time. Elsewhere
 * skinny_supported() returns 0 and skinny.py leaves the general kernels in place.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BLOCK 64

int skinny_supported(void);
int skinny_wide(void);
void skinny_use_avx2_only(int on);
void skinny_f32(const float *x, long rows, long k, const float *w, long n, const float *bias, float *out, long kchunk, int threads);
void skinny_f16(const float *x, long rows, long k, const uint16_t *w, long n, const float *bias, float *out, long kchunk, int threads);
int skinny_i8(const float *x, long rows, long k, const int8_t *w, long n, const int32_t *colsum, const float *wscale, const float *bias, float *out, long variant, int threads);
int skinny_attend(const float *qkv, long rows, long n_head, long head_dim, float *k_cache, float *v_cache, long max_len, long num_slots, const int64_t *slots, const int64_t *positions, float scale, float *out, int threads);
void skinny_layer_norm(const float *x, const float *residual, float *sum, long rows, long n, const float *w, const float *b, float eps, float *y, int threads);
void skinny_gelu_tanh(const float *x, float *y, long count, int threads);
void skinny_pick(const float *logits, long rows, long n, int64_t *index, float *max, float *log_sum, int threads);


/* Decode attention: each row's one new query over its slot's cached keys and values.
 *
 * qkv is (rows, 3 * C), C = n_head * head_dim: the row's query, key and value, heads side by
 * side. The caches are one layer's (slots, n_head, max_len, head_dim). For each row and head this
 * writes the new key and value at the row's position, then computes softmax(q k^T * scale) v over
 * positions 0..position into out (rows, C).
 *
 * Batch invariance by construction: one thread computes a (row, head) from start to end, in an
 * order that depends only on the row's own length (dot products in 16 lanes summed by a fixed
 * tree, keys ascending), so neither the batch nor the number of threads changes a bit. The loops
 * are plain C, vectorised by the compiler without reassociation (-ffp-contract=off): the AVX-512
 * and AVX2 builds below give the same bits. exp is our own (Cephes' polynomial), for the same
 * reason: a libm's vector exp may differ from its scalar one. */
#define LANES 16

static inline __attribute__((always_inline)) float lanes_sum(float *acc)
{
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

static inline __attribute__((always_inline)) float dot(const float *a, const float *b, long n)
{
    float acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i + j < n; j++) acc[j] += a[i + j] * b[i + j];
    return lanes_sum(acc);
}

/* exp(x) for x <= 0, within 2 ulp; below -87 (where exp is under 2^-125) it gives exp(-87). */
static inline __attribute__((always_inline)) float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

#define ATTEND_ONE(NAME, TARGET)                                                                        \
    TARGET static void NAME(const float *q, const float *kn, const float *vn, float *kc, float *vc,      \
                            long pos, long hd, float scale, float *p, float *acc, float *out,           \
                            const char *nk, const char *nv, long nlines)                               \
    {                                                                                                  \
        memcpy(kc + pos * hd, kn, (size_t)hd * sizeof(float));                                         \
        memcpy(vc + pos * hd, vn, (size_t)hd * sizeof(float));                                         \
        long n = pos + 1;                                                                              \
        float m = -INFINITY;                                                                           \
        long issued = 0;                                                                               \
        for (long j = 0; j < n; j++) {                                                                 \
            for (long due = (j + 1) * nlines / n; issued < due; issued++) {                            \
                __builtin_prefetch(nk + issued * 64, 0, 2);                                            \
                __builtin_prefetch(nv + issued * 64, 0, 2);                                            \
            }                                                                                          \
            p[j] = dot(q, kc + j * hd, hd) * scale;                                                    \
            m = p[j] > m ? p[j] : m;                                                                   \
        }                                                                                              \
        for (long j = 0; j < n; j++) p[j] = exp_nonpositive(p[j] - m);                                 \
        float lanes[LANES] = {0};                                                                      \
        long j = 0;                                                                                    \
        for (; j + LANES <= n; j += LANES)                                                             \
            for (int l = 0; l < LANES; l++) lanes[l] += p[j + l];                                      \
        for (int l = 0; j + l < n; l++) lanes[l] += p[j + l];                                          \
        float sum = lanes_sum(lanes);                                                                  \
        for (long d = 0; d < hd; d++) acc[d] = 0.0f;                                                   \
        for (long j = 0; j < n; j++)                                                                   \
            for (long d = 0; d < hd; d++) acc[d] += p[j] * vc[j * hd + d];                             \
        for (long d = 0; d < hd; d++) out[d] = acc[d] / sum;                                           \
    }

/* Layer norm and GELU, row by row: each row (each value, for GELU) computed by one thread in an
 * order fixed by the row's length, so a row's bits do not depend on its batch or the number of
 * threads; plain C, the same bits from every build, as the attention above. */
#define NORM_ROW(NAME, TARGET)                                                                          \
    TARGET static void NAME(const float *x, const float *res, float *sum, long n, const float *w,     \
                            const float *b, float eps, float *y)                                       \
    {                                                                                                  \
        if (res) { /* sum = x + res, normalized */                                                     \
            for (long i = 0; i < n; i++) sum[i] = x[i] + res[i];                                       \
            x = sum;                                                                                   \
        }                                                                                              \
        float lanes[LANES] = {0};                                                                      \
        long i = 0;                                                                                    \
        for (; i + LANES <= n; i += LANES)                                                             \
            for (int l = 0; l < LANES; l++) lanes[l] += x[i + l];                                      \
        for (int l = 0; i + l < n; l++) lanes[l] += x[i + l];                                          \
        float mean = lanes_sum(lanes) / (float)n;                                                      \
        for (int l = 0; l < LANES; l++) lanes[l] = 0.0f;                                               \
        for (i = 0; i + LANES <= n; i += LANES)                                                        \
            for (int l = 0; l < LANES; l++) lanes[l] += (x[i + l] - mean) * (x[i + l] - mean);         \
        for (int l = 0; i + l < n; l++) lanes[l] += (x[i + l] - mean) * (x[i + l] - mean);             \
        float rstd = 1.0f / sqrtf(lanes_sum(lanes) / (float)n + eps);                                  \
        for (i = 0; i < n; i++) y[i] = (x[i] - mean) * rstd * w[i] + b[i];                             \
    }

/* GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh from exp_nonpositive. */
#define GELU_SPAN(NAME, TARGET)                                                                         \
    TARGET static void NAME(const float *x, float *y, long count)                                      \
    {                                                                                                  \
        for (long i = 0; i < count; i++) {                                                             \
            float v = x[i];                                                                            \
            float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);                               \
            float a = u < 0.0f ? u : -u; /* -|u| */                                                    \
            float e = exp_nonpositive(2.0f * a);                                                       \
            float t = (1.0f - e) / (1.0f + e); /* tanh |u| */                                          \
            y[i] = 0.5f * v * (1.0f + (u < 0.0f ? -t : t));                                            \
        }                                                                                              \
    }

/* A row of logits, for sampling: its largest value m, the first index holding it, and
 * log(sum(exp(x - m))), so that the log-softmax of any entry is (x - m) - that. The maximum is
 * kept per lane with the first index reaching it, the sum in 16 lanes added by the fixed tree:
 * the same bits for a row in any batch. (A row of -inf gives m = -inf, index 0, and NaN.) */
#define PICK_ROW(NAME, TARGET)                                                                          \
    TARGET static void NAME(const float *x, long n, int64_t *index, float *max, float *log_sum)       \
    {                                                                                                  \
        float top[LANES];                                                                              \
        int32_t at[LANES]; /* (rows are shorter than 2^31) */                                          \
        for (int l = 0; l < LANES; l++) top[l] = -INFINITY, at[l] = (int32_t)n;                        \
        long i = 0;                                                                                    \
        for (; i + LANES <= n; i += LANES)                                                             \
            for (int l = 0; l < LANES; l++) {                                                          \
                int higher = x[i + l] > top[l];                                                        \
                top[l] = higher ? x[i + l] : top[l];                                                   \
                at[l] = higher ? (int32_t)(i + l) : at[l];                                             \
            }                                                                                          \
        for (int l = 0; i + l < n; l++)                                                                \
            if (x[i + l] > top[l]) top[l] = x[i + l], at[l] = (int32_t)(i + l);                        \
        float m = top[0];                                                                              \
        int64_t first = at[0];                                                                         \
        for (int l = 1; l < LANES; l++)                                                                \
            if (top[l] > m || (top[l] == m && at[l] < first)) m = top[l], first = at[l];               \
        float lanes[LANES] = {0};                                                                      \
        for (i = 0; i + LANES <= n; i += LANES)                                                        \
            for (int l = 0; l < LANES; l++) lanes[l] += exp_nonpositive(x[i + l] - m);                 \
        for (int l = 0; i + l < n; l++) lanes[l] += exp_nonpositive(x[i + l] - m);                     \
        *index = first < n ? first : 0;                                                                \
        *max = m;                                                                                      \
        *log_sum = m > -INFINITY ? logf(lanes_sum(lanes)) : NAN;                                       \
    }

#if defined(__x86_64__)
#define WIDE __attribute__((target("avx512f")))
#define NARROW __attribute__((target("avx2")))
static int use_avx512(void);
#else
#define WIDE
#define NARROW
#endif
ATTEND_ONE(attend512, WIDE)
ATTEND_ONE(attend256, NARROW)
NORM_ROW(norm512, WIDE)
NORM_ROW(norm256, NARROW)
GELU_SPAN(gelu512, WIDE)
GELU_SPAN(gelu256, NARROW)
PICK_ROW(pick512, WIDE)
PICK_ROW(pick256, NARROW)

/* The row operations of the build this CPU runs (the AVX-512 one, or the AVX2 one: the same bits). */
struct row_ops {
    void (*attend)(const float *, const float *, const float *, float *, float *, long, long, float, float *, float *,
                   float *, const char *, const char *, long);
    void (*norm)(const float *, const float *, float *, long, const float *, const float *, float, float *);
    void (*gelu)(const float *, float *, long);
    void (*pick)(const float *, long, int64_t *, float *, float *);
};

static struct row_ops row_ops(void)
{
#if defined(__x86_64__)
    if (use_avx512()) return (struct row_ops){attend512, norm512, gelu512, pick512};
#endif
    return (struct row_ops){attend256, norm256, gelu256, pick256};
}

void skinny_layer_norm(const float *x, const float *residual, float *sum, long rows, long n, const float *w, const float *b,
                       float eps, float *y, int threads)
{
    struct row_ops ops = row_ops();
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (rows >= 8)")
    for (long r = 0; r < rows; r++)
        ops.norm(x + r * n, residual ? residual + r * n : NULL, residual ? sum + r * n : NULL, n, w, b, eps, y + r * n);
}

#define GELU_CHUNK 4096
void skinny_gelu_tanh(const float *x, float *y, long count, int threads)
{
    struct row_ops ops = row_ops();
    long chunks = (count + GELU_CHUNK - 1) / GELU_CHUNK;
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (chunks >= 4)")
    for (long c = 0; c < chunks; c++) {
        long start = c * GELU_CHUNK;
        ops.gelu(x + start, y + start, count - start < GELU_CHUNK ? count - start : GELU_CHUNK);
    }
}

void skinny_pick(const float *logits, long rows, long n, int64_t *index, float *max, float *log_sum, int threads)
{
    struct row_ops ops = row_ops();
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (rows >= 2)")
    for (long r = 0; r < rows; r++) ops.pick(logits + r * n, n, index + r, max + r, log_sum + r);
}

/* 0; -1 where a thread's scratch could not be allocated (out then incomplete); -2, with nothing
 * written, where a position is outside 0..max_len-1 or a slot outside 0..slots-1. */
int skinny_attend(const float *qkv, long rows, long n_head, long head_dim, float *k_cache, float *v_cache, long max_len,
                  long num_slots, const int64_t *slots, const int64_t *positions, float scale, float *out, int threads)
{
    long C = n_head * head_dim;
    int failed = 0;
    for (long r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= max_len || slots[r] < 0 || slots[r] >= num_slots) return -2;
    struct row_ops ops = row_ops();
    _Pragma("omp parallel num_threads(threads)")
    {
        float *p = malloc((size_t)max_len * sizeof(float)), *acc = malloc((size_t)head_dim * sizeof(float));
        if (!p || !acc) {
            _Pragma("omp atomic write") failed = 1;
        }
        _Pragma("omp for schedule(static)")
        for (long t = 0; t < rows * n_head; t++) {
            if (!p || !acc) continue;
            long r = t / n_head, h = t % n_head;
            const float *q = qkv + r * 3 * C + h * head_dim;
            long cached = (slots[r] * n_head + h) * max_len * head_dim;
            long r1 = (t + 1) / n_head, h1 = (t + 1) % n_head, next = 0, lines = 0;
            if (t + 1 < rows * n_head) { /* the next (row, head)'s keys and values, fetched meanwhile */
                next = (slots[r1] * n_head + h1) * max_len * head_dim;
                lines = positions[r1] * head_dim * (long)sizeof(float) / 64;
            }
            ops.attend(q, q + C, q + 2 * C, k_cache + cached, v_cache + cached, positions[r], head_dim, scale, p, acc,
                       out + r * C + h * head_dim, (const char *)(k_cache + next), (const char *)(v_cache + next), lines);
        }
        free(p);
        free(acc);
    }
    return failed ? -1 : 0;
}

#if defined(__x86_64__)
#include <immintrin.h>

static int avx2_only; /* tests set it to run the AVX2 loops on an AVX-512 machine */

void skinny_use_avx2_only(int on) { avx2_only = on; }

static int use_avx512(void)
{
    return !avx2_only && __builtin_cpu_supports("avx512f");
}

int skinny_wide(void) { return use_avx512(); }

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

/* Up to TILE_ROWS rows against one block of 64 outputs; WTYPE and LOAD say how the weight is
 * stored. Each weight vector loaded feeds the fused multiply-adds of every row of the tile, so the
 * block's weight is read once per tile rather than once per row (from L2 after the first tile):
 * 6 rows x 4 vectors are 24 accumulators of AVX-512's 32 registers. Each output's arithmetic is
 * the same whatever the tile: per chunk, zero plus x[i] * w[i] fused for i ascending, then added
 * to the running total (sums, rows x 64, written by the first chunk). R is a constant where the
 * tile functions below call this, so its loops unroll and the accumulators stay in registers. */
#define TILE_ROWS 6
#define STREAMS 4 /* prefetch streams over the next block */
#define AVX512_TILE(NAME, WTYPE, LOAD)                                                                   \
    __attribute__((target("avx512f"), always_inline)) static inline void NAME(                         \
        const float *x, long k, const WTYPE *wb, long kchunk, float *sums, const int R, const char *pf, \
        const char *pf_end, long part, long step, long due)                                            \
    {                                                                                                  \
        for (long k0 = 0; k0 < k; k0 += kchunk) {                                                      \
            long k1 = k0 + kchunk < k ? k0 + kchunk : k;                                               \
            __m512 a[TILE_ROWS][4];                                                                    \
            _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)                                        \
                a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();                           \
            const WTYPE *w = wb + k0 * BLOCK;                                                          \
            for (long i = k0; i < k1; i++, w += BLOCK) {                                               \
                for (due += step; due >= STREAMS << 16 && pf < pf_end; due -= STREAMS << 16, pf += 64) \
                    for (int j = 0; j < STREAMS; j++) _mm_prefetch(pf + j * part, _MM_HINT_T1);         \
                __m512 w0 = LOAD(w), w1 = LOAD(w + 16), w2 = LOAD(w + 32), w3 = LOAD(w + 48);          \
                _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {                                  \
                    __m512 xv = _mm512_set1_ps(x[r * k + i]);                                          \
                    a[r][0] = _mm512_fmadd_ps(xv, w0, a[r][0]);                                        \
                    a[r][1] = _mm512_fmadd_ps(xv, w1, a[r][1]);                                        \
                    a[r][2] = _mm512_fmadd_ps(xv, w2, a[r][2]);                                        \
                    a[r][3] = _mm512_fmadd_ps(xv, w3, a[r][3]);                                        \
                }                                                                                      \
            }                                                                                          \
            _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) for (int j = 0; j < 4; j++) {          \
                float *s = sums + r * BLOCK + 16 * j;                                                  \
                _mm512_storeu_ps(s, k0 == 0 ? a[r][j] : _mm512_add_ps(_mm512_loadu_ps(s), a[r][j]));   \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    __attribute__((target("avx512f"))) static void NAME##_rows(                                        \
        const float *x, long rows, long k, const WTYPE *wb, long kchunk, float *sums, const char *pf,  \
        const char *pf_end, long part, long step, long due)                                            \
    {                                                                                                  \
        switch (rows) {                                                                                \
        case 1: NAME(x, k, wb, kchunk, sums, 1, pf, pf_end, part, step, due); break;                   \
        case 2: NAME(x, k, wb, kchunk, sums, 2, pf, pf_end, part, step, due); break;                   \
        case 3: NAME(x, k, wb, kchunk, sums, 3, pf, pf_end, part, step, due); break;                   \
        case 4: NAME(x, k, wb, kchunk, sums, 4, pf, pf_end, part, step, due); break;                   \
        case 5: NAME(x, k, wb, kchunk, sums, 5, pf, pf_end, part, step, due); break;                   \
        default: NAME(x, k, wb, kchunk, sums, 6, pf, pf_end, part, step, due); break;                  \
        }                                                                                              \
    }

/* AVX2 has 16 registers: a chunk's 8 accumulators stay in registers, the running totals in
 * memory (added once per chunk). */
#define AVX2_BLOCK(NAME, WTYPE, LOAD)                                                                    \
    __attribute__((target("avx2,fma,f16c"))) static void NAME(const float *xr, long k, const WTYPE *wb, \
                                                              long kchunk, float *sums)                \
    {                                                                                                  \
        for (long k0 = 0; k0 < k; k0 += kchunk) {                                                      \
            long k1 = k0 + kchunk < k ? k0 + kchunk : k;                                               \
            __m256 a[8];                                                                               \
            for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();                                    \
            const WTYPE *w = wb + k0 * BLOCK;                                                          \
            for (long i = k0; i < k1; i++, w += BLOCK) {                                               \
                __m256 xv = _mm256_set1_ps(xr[i]);                                                     \
                for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(xv, LOAD(w + 8 * j), a[j]);         \
            }                                                                                          \
            for (int j = 0; j < 8; j++) {                                                              \
                __m256 t = k0 == 0 ? a[j] : _mm256_add_ps(_mm256_loadu_ps(sums + 8 * j), a[j]);        \
                _mm256_storeu_ps(sums + 8 * j, t);                                                     \
            }                                                                                          \
        }                                                                                              \
    }

#define LOAD512_F32(p) _mm512_loadu_ps(p)
#define LOAD512_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD256_F32(p) _mm256_loadu_ps(p)
#define LOAD256_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))

/* One to three rows against NB adjacent blocks at once, each block's outputs summed exactly as the
 * tile sums them (per chunk from zero, k ascending, then added to the running total), so a row's
 * bits are the same from either. At a few rows a product only streams its weight, and one stream
 * per core leaves the memory idle part of the time: summing 500 MB on two threads ran at 33.5 GB/s
 * with one stream each, 41 with two side by side. So NB blocks are read side by side (up to
 * SIDE_BY_SIDE, and 4 * NB * R accumulators, at most 24), each line also fetched STREAM_AHEAD
 * bytes before it is read. GPT-2 small's one-row step (its 49 products and the rest of its blocks,
 * alternated in one process) took 15.9 ms one block at a time, 14.2 with three side by side, 13.3
 * with the fetch ahead too; two blocks 13.9 and four 16.2 (GPT-2's block counts do not split into
 * fours evenly between two threads), fetching 512 bytes ahead 13.9, 2048 15.7. At two rows 15.2 ->
 * 13.0 ms, at three 16.1 -> 13.6. From four rows the tiles do better (one block per tile, the next
 * one fetched into L2 meanwhile): 17.1 against 19.1 ms this way. */
#define FEW_ROWS 3
#define SIDE_BY_SIDE 3
#define ACCUMULATORS 24 /* of AVX-512's 32 registers, as the tiles */
#define STREAM_AHEAD 1024
#define AVX512_SIDE(NAME, WTYPE, LOAD)                                                                   \
    __attribute__((target("avx512f"), always_inline)) static inline void NAME(                         \
        const float *x, long k, const WTYPE *wb, long kchunk, float *sums, const int NB, const int R)  \
    {                                                                                                  \
        for (long k0 = 0; k0 < k; k0 += kchunk) {                                                      \
            long k1 = k0 + kchunk < k ? k0 + kchunk : k;                                               \
            __m512 a[FEW_ROWS][4 * SIDE_BY_SIDE];                                                      \
            _Pragma("GCC unroll 3") for (int r = 0; r < R; r++)                                        \
                _Pragma("GCC unroll 12") for (int j = 0; j < 4 * NB; j++) a[r][j] = _mm512_setzero_ps(); \
            for (long i = k0; i < k1; i++) {                                                           \
                _Pragma("GCC unroll 12") for (int j = 0; j < 4 * NB; j++) {                            \
                    const WTYPE *w = wb + (j / 4) * k * BLOCK + i * BLOCK + 16 * (j % 4);              \
                    if (sizeof(WTYPE) == 4 || j % 2 == 0) /* once per 64-byte line */                  \
                        _mm_prefetch((const char *)w + STREAM_AHEAD, _MM_HINT_T0);                     \
                    __m512 wv = LOAD(w);                                                               \
                    _Pragma("GCC unroll 3") for (int r = 0; r < R; r++)                                \
                        a[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * k + i]), wv, a[r][j]);          \
                }                                                                                      \
            }                                                                                          \
            _Pragma("GCC unroll 3") for (int r = 0; r < R; r++)                                        \
                _Pragma("GCC unroll 12") for (int j = 0; j < 4 * NB; j++) {                            \
                    float *s = sums + r * SIDE_BY_SIDE * BLOCK + 16 * j;                               \
                    _mm512_storeu_ps(s, k0 == 0 ? a[r][j] : _mm512_add_ps(_mm512_loadu_ps(s), a[r][j])); \
                }                                                                                      \
        }                                                                                              \
    }                                                                                                  \
    __attribute__((target("avx512f"))) static void NAME##_blocks(const float *x, long rows, long k,    \
                                                                 const WTYPE *wb, long kchunk,         \
                                                                 float *sums, long nb)                 \
    { /* each (rows, nb) within ACCUMULATORS, keyed rows * 4 + nb */                                   \
        switch (rows * 4 + nb) {                                                                       \
        case 5: NAME(x, k, wb, kchunk, sums, 1, 1); break;                                             \
        case 6: NAME(x, k, wb, kchunk, sums, 2, 1); break;                                             \
        case 7: NAME(x, k, wb, kchunk, sums, 3, 1); break;                                             \
        case 9: NAME(x, k, wb, kchunk, sums, 1, 2); break;                                             \
        case 10: NAME(x, k, wb, kchunk, sums, 2, 2); break;                                            \
        case 11: NAME(x, k, wb, kchunk, sums, 3, 2); break;                                            \
        case 13: NAME(x, k, wb, kchunk, sums, 1, 3); break;                                            \
        default: NAME(x, k, wb, kchunk, sums, 2, 3); break;                                            \
        }                                                                                              \
    }

/* How many blocks side by side, up to `most`: fewer where that splits the blocks among the threads
 * (each takes whole groups, in order) enough more evenly to make up for it, counting a block read
 * beside others a fifth faster than one alone (summing 500 MB: 41 against 33.5 GB/s). */
static long side_by_side(long blocks, int threads, long most)
{
    long best = most, least = -1;
    for (long nb = most; nb >= 1; nb--) {
        long groups = (blocks + nb - 1) / nb, per_thread = (groups + threads - 1) / threads;
        long busiest = per_thread * nb < blocks ? per_thread * nb : blocks; /* the busiest thread's blocks */
        long cost = busiest * (nb == 1 ? 6 : 5);
        if (least < 0 || cost < least) best = nb, least = cost;
    }
    return best;
}

AVX512_SIDE(side512_f32, float, LOAD512_F32)
AVX512_SIDE(side512_f16, uint16_t, LOAD512_F16)
AVX512_TILE(tile512_f32, float, LOAD512_F32)
AVX512_TILE(tile512_f16, uint16_t, LOAD512_F16)
AVX2_BLOCK(block256_f32, float, LOAD256_F32)
AVX2_BLOCK(block256_f16, uint16_t, LOAD256_F16)

#define SKINNY(NAME, WTYPE, T512, B256, S512)                                                            \
    void NAME(const float *x, long rows, long k, const WTYPE *w, long n, const float *bias, float *out,   \
              long kchunk, int threads)                                                                 \
    {                                                                                                    \
        long blocks = (n + BLOCK - 1) / BLOCK;                                                           \
        int wide = use_avx512();                                                                         \
        if (wide && rows <= FEW_ROWS) { /* blocks side by side (S512, above) */                         \
            long most = ACCUMULATORS / (4 * rows) < SIDE_BY_SIDE ? ACCUMULATORS / (4 * rows) : SIDE_BY_SIDE; \
            long nb = side_by_side(blocks, threads, most), groups = (blocks + nb - 1) / nb;              \
            _Pragma("omp parallel for num_threads(threads) schedule(static)")                            \
            for (long g = 0; g < groups; g++) {                                                          \
                float sums[FEW_ROWS * SIDE_BY_SIDE * BLOCK];                                             \
                long b = g * nb, m = blocks - b < nb ? blocks - b : nb;                                  \
                S512##_blocks(x, rows, k, w + b * k * BLOCK, kchunk, sums, m);                           \
                for (long r = 0; r < rows; r++)                                                          \
                    for (long j = 0; j < m; j++) {                                                       \
                        long n0 = (b + j) * BLOCK, ncols = n - n0 < BLOCK ? n - n0 : BLOCK;              \
                        float *s = sums + r * SIDE_BY_SIDE * BLOCK + j * BLOCK;                          \
                        finish(s, bias ? bias + n0 : NULL, out + r * n + n0, ncols);                     \
                    }                                                                                    \
            }                                                                                            \
            return;                                                                                      \
        }                                                                                                \
        long tiles = (rows + TILE_ROWS - 1) / TILE_ROWS; /* of rows / tiles or one more, in order */     \
        long block_bytes = k * BLOCK * (long)sizeof(WTYPE), lines = block_bytes / 64;                    \
        /* lines of the next block to fetch per k, 16.16 fixed point: evenly over all the tiles */     \
        long step = (lines << 16) / (tiles * k);                                                         \
        long part = lines / STREAMS * 64; /* bytes of each stream */                                     \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                \
        for (long b = 0; b < blocks; b++) {                                                              \
            float sums[TILE_ROWS * BLOCK];                                                               \
            long n0 = b * BLOCK, ncols = n - n0 < BLOCK ? n - n0 : BLOCK;                                \
            const WTYPE *wb = w + b * k * BLOCK;                                                         \
            const float *bb = bias ? bias + n0 : NULL;                                                   \
            if (!wide) {                                                                                 \
                for (long r = 0; r < rows; r++) {                                                        \
                    B256(x + r * k, k, wb, kchunk, sums);                                                \
                    finish(sums, bb, out + r * n + n0, ncols);                                           \
                }                                                                                        \
                continue;                                                                                \
            }                                                                                            \
            /* the next block's weight is fetched into L2 meanwhile, spread evenly over the tiles, as  \
             * STREAMS streams (its quarters) side by side: GPT-2 small's products at 32 rows take    \
             * 26.9 ms, against 31.0 with one stream, 36.3 with one line per k over the first tiles,  \
             * 43.9 with no prefetch (the hardware's prefetchers stay within the block). The last few  \
             * lines (lines % STREAMS) are left to them. */                                           \
            const char *next = (const char *)(wb + k * BLOCK);                                           \
            const char *next_end = b + 1 < blocks ? next + part : next; /* the first stream's end */     \
            for (long t = 0, r0 = 0; t < tiles; t++) {                                                   \
                long size = rows / tiles + (t < rows % tiles);                                           \
                long done = t * k * step; /* (lines << 16) fetched before this tile */                   \
                const char *pf = next + done / (STREAMS << 16) * 64;                                     \
                pf = pf < next_end ? pf : next_end;                                                      \
                T512##_rows(x + r0 * k, size, k, wb, kchunk, sums, pf, next_end, part, step,             \
                            done % (STREAMS << 16));                                                     \
                for (long r = 0; r < size; r++) finish(sums + r * BLOCK, bb, out + (r0 + r) * n + n0, ncols); \
                r0 += size;                                                                              \
            }                                                                                            \
        }                                                                                                \
    }

SKINNY(skinny_f32, float, tile512_f32, block256_f32, side512_f32)
SKINNY(skinny_f16, uint16_t, tile512_f16, block256_f16, side512_f16)

/* int8: kernels.py's int8 product, FBGEMM's dynamic int8 kernel included, reproduced. kernels.py
 * divides each row by its largest magnitude s (at least 1e-30) and appends the columns +1 and -1,
 * so FBGEMM always picks scale 2/127 and zero point 64 with its 7-bit activation range; it
 * quantizes each activation to a byte, sums against the int8 weight in int32 (exact: any order
 * gives the same), and scales (sum - 64 * colsum[n]) by the two scales; kernels.py multiplies
 * the row's s back and adds the bias. This does all of it per row. `variant` picks among the
 * ways each step might round: bit 0, the two scales multiplied first; bits 1-2, quantize as
 * round(x / step) + 64, round(x * (1 / step)) + 64, or round(fma(x, 1 / step, 64)); bit 3, the
 * bias added in one fused multiply-add. skinny.py keeps the one that agrees.
 *
 * The weight is blocked (N/64, K/4, 64, 4): for each group of 4 k, 64 outputs' 4 bytes each, so
 * one 64-byte line is 16 outputs' 4 products (what VNNI's dot product reads). */
#define I8_ZERO_POINT 64

/* The row's scale s; its activations quantized into q (kpad bytes, zero past k). */
static float quantize_row(const float *x, long k, long kpad, long variant, uint8_t *q)
{
    const float step = (float)(2.0 / 127.0), inverse = 1.0f / step;
    float s = 0.0f;
    for (long i = 0; i < k; i++) s = fabsf(x[i]) > s ? fabsf(x[i]) : s;
    s = s < 1e-30f ? 1e-30f : s;
    for (long i = 0; i < k; i++) {
        float unit = x[i] / s, r;
        switch ((variant >> 1) & 3) {
        case 0: r = nearbyintf(unit / step) + I8_ZERO_POINT; break;
        case 1: r = nearbyintf(unit * inverse) + I8_ZERO_POINT; break;
        default: r = nearbyintf(fmaf(unit, inverse, (float)I8_ZERO_POINT)); break;
        }
        q[i] = (uint8_t)(r < 0 ? 0 : r > 255 ? 255 : r); /* clamped to the byte, not to 7 bits: 1.0 gives 128 */
    }
    for (long i = k; i < kpad; i++) q[i] = 0;
    return s;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void block512_i8(const uint8_t *q, long groups, const int8_t *wb, int32_t *sums)
{
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    const int8_t *w = wb;
    for (long g = 0; g < groups; g++, w += 4 * BLOCK) {
        int32_t four;
        memcpy(&four, q + 4 * g, 4);
        __m512i xv = _mm512_set1_epi32(four);
        a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_loadu_si512(w));
        a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_loadu_si512(w + 64));
        a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_loadu_si512(w + 128));
        a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_loadu_si512(w + 192));
    }
    _mm512_storeu_si512(sums, a0), _mm512_storeu_si512(sums + 16, a1);
    _mm512_storeu_si512(sums + 32, a2), _mm512_storeu_si512(sums + 48, a3);
}

/* AVX2: unsigned x signed byte pairs into int16 (no saturation: 2 * 127 * 127 < 32767), pairs of
 * those into int32. */
__attribute__((target("avx2"))) static void block256_i8(const uint8_t *q, long groups, const int8_t *wb, int32_t *sums)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_si256();
    const int8_t *w = wb;
    for (long g = 0; g < groups; g++, w += 4 * BLOCK) {
        int32_t four;
        memcpy(&four, q + 4 * g, 4);
        __m256i xv = _mm256_set1_epi32(four);
        for (int j = 0; j < 8; j++) {
            __m256i pairs = _mm256_maddubs_epi16(xv, _mm256_loadu_si256((const __m256i *)(w + 32 * j)));
            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs, ones));
        }
    }
    for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(sums + 8 * j), acc[j]);
}

/* 0, or -1 (out untouched) where the rows' quantized copy cannot be allocated or there are more
 * than 16 rows. */
int skinny_i8(const float *x, long rows, long k, const int8_t *w, long n, const int32_t *colsum, const float *wscale,
              const float *bias, float *out, long variant, int threads)
{
    long kpad = (k + 3) / 4 * 4, blocks = (n + BLOCK - 1) / BLOCK;
    uint8_t *q = malloc((size_t)(rows * kpad));
    float scale[16];
    if (!q || rows > 16) {
        free(q);
        return -1;
    }
    for (long r = 0; r < rows; r++) scale[r] = quantize_row(x + r * k, k, kpad, variant, q + r * kpad);
    const float a_scale = (float)(2.0 / 127.0);
    int vnni = use_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (long b = 0; b < blocks; b++) {
        int32_t sums[BLOCK];
        long n0 = b * BLOCK, ncols = n - n0 < BLOCK ? n - n0 : BLOCK;
        for (long r = 0; r < rows; r++) {
            if (vnni)
                block512_i8(q + r * kpad, kpad / 4, w + b * kpad * BLOCK, sums);
            else
                block256_i8(q + r * kpad, kpad / 4, w + b * kpad * BLOCK, sums);
            float *o = out + r * n + n0;
            for (long j = 0; j < ncols; j++) {
                int32_t raw = sums[j] - I8_ZERO_POINT * colsum[n0 + j];
                float fb = (variant & 1) ? (float)raw * (a_scale * wscale[n0 + j]) : (float)raw * a_scale * wscale[n0 + j];
                if (!bias)
                    o[j] = fb * scale[r];
                else
                    o[j] = (variant & 8) ? fmaf(fb, scale[r], bias[n0 + j]) : fb * scale[r] + bias[n0 + j];
            }
        }
    }
    free(q);
    return 0;
}

#else /* not x86-64: nothing here; skinny.py keeps the general kernels */

int skinny_supported(void) { return 0; }
int skinny_wide(void) { return 0; }
void skinny_use_avx2_only(int on) {}
void skinny_f32(const float *x, long rows, long k, const float *w, long n, const float *bias, float *out, long kchunk, int threads) {}
void skinny_f16(const float *x, long rows, long k, const uint16_t *w, long n, const float *bias, float *out, long kchunk, int threads) {}
int skinny_i8(const float *x, long rows, long k, const int8_t *w, long n, const int32_t *colsum, const float *wscale, const float *bias, float *out, long variant, int threads) { return -1; }

#endif

/* A GPT-2 block described for block_decode: its layer norms and its four products (each a
 * weight in the loops' layout and the order that agreed with the general kernel, skinny.py). */
struct skinny_linear {
    const void *w;
    const float *bias;
    const int32_t *colsum; /* int8 */
    const float *scales;   /* int8 */
    long n, k, order;
    long storage; /* 0 float32, 1 float16, 2 int8 */
};

struct skinny_block {
    long n_embd, n_head, head_dim;
    float eps, scale;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    struct skinny_linear attn, attn_proj, fc, proj;
};

static int linear(const struct skinny_linear *l, const float *in, long rows, float *out, int threads)
{
    if (l->storage == 0)
        skinny_f32(in, rows, l->k, l->w, l->n, l->bias, out, l->order, threads);
    else if (l->storage == 1)
        skinny_f16(in, rows, l->k, l->w, l->n, l->bias, out, l->order, threads);
    else
        return skinny_i8(in, rows, l->k, l->w, l->n, l->colsum, l->scales, l->bias, out, l->order, threads);
    return 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One block of a decode step of a few rows (skinny.MAX_ROWS): what gpt2.Block computes op by op
 * (layer norm, the q/k/v product, skinny_attend, the output product, the residual add and second
 * layer norm, the MLP's products around GELU, the last residual add), by the same functions in
 * the same order, so its numbers are bitwise the op-by-op ones. x (rows, C) is updated in place;
 * the caches are this layer's; scratch holds rows * (6 C + d_ff) floats; seconds[0..1] grow by the
 * wall time of the attention half and of the MLP half. 0, -1 (out of memory) or -2 (bad slot or
 * position). */
static int block_decode(const struct skinny_block *blk, struct row_ops ops, float *x, long rows, float *k_cache,
                        float *v_cache, long max_len, long num_slots, const int64_t *slots, const int64_t *positions,
                        float *scratch, double *seconds, int threads)
{
    long C = blk->n_embd;
    float *h = scratch, *qkv = h + rows * C, *att = qkv + 3 * rows * C, *a = att + rows * C, *f = a + rows * C;
    int status;
    double t0 = now();
    for (long r = 0; r < rows; r++) ops.norm(x + r * C, NULL, NULL, C, blk->ln1_w, blk->ln1_b, blk->eps, h + r * C);
    if ((status = linear(&blk->attn, h, rows, qkv, threads))) return status;
    status = skinny_attend(qkv, rows, blk->n_head, blk->head_dim, k_cache, v_cache, max_len, num_slots, slots, positions,
                           blk->scale, att, threads);
    if (status) return status;
    if ((status = linear(&blk->attn_proj, att, rows, a, threads))) return status;
    double t1 = now();
    for (long r = 0; r < rows; r++) /* x += a; h = ln_2(x) */
        ops.norm(x + r * C, a + r * C, x + r * C, C, blk->ln2_w, blk->ln2_b, blk->eps, h + r * C);
    if ((status = linear(&blk->fc, h, rows, f, threads))) return status;
    ops.gelu(f, f, rows * blk->fc.n);
    if ((status = linear(&blk->proj, f, rows, a, threads))) return status;
    for (long i = 0; i < rows * C; i++) x[i] = x[i] + a[i];
    seconds[0] += t1 - t0;
    seconds[1] += now() - t1;
    return 0;
}

/* Every block of a decode step, in one call: block_decode for blocks[0..n_layers-1] in turn, the
 * caches (n_layers, num_slots, n_head, max_len, head_dim). One call rather than one per block,
 * because each return to Python after a block's products costs 10-20 us more than the call
 * itself: the products stream megabytes through the caches, and the interpreter's own code and
 * data come back from memory (measured: 8.6 us into C and 9.6 us back out after a block of int8
 * products, against 0.9 and 0.2 us after an empty call). seconds[0..1] get the blocks' attention
 * and MLP halves, summed. */
int skinny_decode_layers(const struct skinny_block *const *blocks, long n_layers, float *x, long rows, float *k_cache,
                         float *v_cache, long max_len, long num_slots, const int64_t *slots, const int64_t *positions,
                         float *scratch, double *seconds, int threads);

int skinny_decode_layers(const struct skinny_block *const *blocks, long n_layers, float *x, long rows, float *k_cache,
                         float *v_cache, long max_len, long num_slots, const int64_t *slots, const int64_t *positions,
                         float *scratch, double *seconds, int threads)
{
    struct row_ops ops = row_ops();
    long layer = num_slots * blocks[0]->n_head * max_len * blocks[0]->head_dim;
    seconds[0] = seconds[1] = 0.0;
    for (long l = 0; l < n_layers; l++) {
        int status = block_decode(blocks[l], ops, x, rows, k_cache + l * layer, v_cache + l * layer, max_len, num_slots,
                                  slots, positions, scratch, seconds, threads);
        if (status) return status;
    }
    return 0;
}
