/*
 * int8 pseudo-gradient codec: chunked quantize, dequantize and fused decode-and-accumulate.
 *
 * The arithmetic is specified in p2p_trainer/codec/int8_format.py and mirrored exactly by
 * p2p_trainer/codec/reference.py: codes must match bit for bit, so every floating point
 * operation here has a fixed order, and the file must be built with -ffp-contract=off and
 * without -ffast-math (a fused multiply-add or a reassociated sum would change the codes).
 *
 * Chunks are independent, so threads take whole chunks from a shared counter.
 * Loaded with ctypes; all pointers are to contiguous little-endian buffers.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float/double expressions must be evaluated in their own precision (FLT_EVAL_METHOD 0)"
#endif

#define P2PQ_ABI_VERSION 1
#define NB 256
#define BLOCK 64
#define MAX_THREADS 256
#define N_SUB 4    /* interleaved histograms: consecutive values often share a bucket */
#define PIECE 1024 /* values coded then histogrammed together while in L1 */

int p2pq_abi_version(void) { return P2PQ_ABI_VERSION; }

/* ---- threading: a pool-less fork/join over chunk indices ---------------------------------- */

typedef void (*chunk_fn)(void *ctx, int64_t chunk_index);

typedef struct {
    chunk_fn fn;
    void *ctx;
    int64_t n_chunks;
    int64_t next; /* atomically incremented */
} fork_job;

static void *fork_worker(void *arg) {
    fork_job *job = (fork_job *)arg;
    for (;;) {
        int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (c >= job->n_chunks) break;
        job->fn(job->ctx, c);
    }
    return NULL;
}

static void run_chunks(chunk_fn fn, void *ctx, int64_t n_chunks, int n_threads) {
    fork_job job = {fn, ctx, n_chunks, 0};
    pthread_t tid[MAX_THREADS];
    int started = 0;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n_chunks) n_threads = (int)n_chunks;
    /* A thread that fails to start just leaves more chunks to the others. */
    for (int t = 1; t < n_threads; t++)
        if (pthread_create(&tid[started], NULL, fork_worker, &job) == 0) started++;
    fork_worker(&job);
    for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
}

/* ---- statistics: the fixed summation tree of int8_format.py step 1 ------------------------ */

/* Sums of d = x - x0 and d*d over one block of BLOCK values, folded in halves. The caller pads a
 * short block with x[0], which gives d == +0.0 exactly, the same as the reference's zero padding. */
#if defined(__AVX2__)
static inline __m256d load4d(const float *p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

static inline void block_sums(const float *x, double x0, double *s1, double *s2) {
    const __m256d o = _mm256_set1_pd(x0);
    __m256d d[16];
    for (int k = 0; k < 16; k++) d[k] = _mm256_sub_pd(load4d(x + 4 * k), o);
    /* Vector k holds elements 4k..4k+3, so folding element i with i+h (h = 32, 16, 8, 4) is folding
     * vector k with k+h/4; evaluated depth first to stay within 16 registers. */
    __m256d a[8], q[8];
    for (int k = 0; k < 8; k++) {
        a[k] = _mm256_add_pd(d[k], d[k + 8]);
        q[k] = _mm256_add_pd(_mm256_mul_pd(d[k], d[k]), _mm256_mul_pd(d[k + 8], d[k + 8]));
    }
    for (int k = 0; k < 4; k++) {
        a[k] = _mm256_add_pd(a[k], a[k + 4]);
        q[k] = _mm256_add_pd(q[k], q[k + 4]);
    }
    for (int k = 0; k < 2; k++) {
        a[k] = _mm256_add_pd(a[k], a[k + 2]);
        q[k] = _mm256_add_pd(q[k], q[k + 2]);
    }
    __m256d A = _mm256_add_pd(a[0], a[1]), Q = _mm256_add_pd(q[0], q[1]);
    __m128d A2 = _mm_add_pd(_mm256_castpd256_pd128(A), _mm256_extractf128_pd(A, 1));
    __m128d Q2 = _mm_add_pd(_mm256_castpd256_pd128(Q), _mm256_extractf128_pd(Q, 1));
    *s1 = _mm_cvtsd_f64(_mm_add_sd(A2, _mm_unpackhi_pd(A2, A2)));
    *s2 = _mm_cvtsd_f64(_mm_add_sd(Q2, _mm_unpackhi_pd(Q2, Q2)));
}
#else
static inline void block_sums(const float *x, double x0, double *s1, double *s2) {
    double d[BLOCK], q[BLOCK];
    for (int i = 0; i < BLOCK; i++) {
        double t = (double)x[i] - x0;
        d[i] = t;
        q[i] = t * t;
    }
    for (int h = BLOCK / 2; h >= 1; h /= 2)
        for (int i = 0; i < h; i++) {
            d[i] = d[i] + d[i + h];
            q[i] = q[i] + q[i + h];
        }
    *s1 = d[0];
    *s2 = q[0];
}
#endif

/* Adjacent-pairwise sum of the block sums, as a binary counter; trailing zero blocks pad the
 * block count to a power of two exactly like the reference's zero padding. */
static void chunk_sums(const float *x, int64_t n, double *s1, double *s2) {
    double st1[64], st2[64];
    int level[64], sp = 0;
    int64_t n_blocks = (n + BLOCK - 1) / BLOCK, padded = 1;
    const double x0 = (double)x[0];
    while (padded < n_blocks) padded *= 2;
    for (int64_t b = 0; b < padded; b++) {
        double b1 = 0.0, b2 = 0.0;
        if (b < n_blocks) {
            int64_t len = n - b * BLOCK;
            if (len >= BLOCK) {
                block_sums(x + b * BLOCK, x0, &b1, &b2);
            } else {
                float tail[BLOCK];
                for (int i = 0; i < BLOCK; i++) tail[i] = i < len ? x[b * BLOCK + i] : x[0];
                block_sums(tail, x0, &b1, &b2);
            }
        }
        st1[sp] = b1;
        st2[sp] = b2;
        level[sp] = 0;
        sp++;
        while (sp >= 2 && level[sp - 1] == level[sp - 2]) {
            st1[sp - 2] = st1[sp - 2] + st1[sp - 1];
            st2[sp - 2] = st2[sp - 2] + st2[sp - 1];
            level[sp - 2]++;
            sp--;
        }
    }
    *s1 = st1[0];
    *s2 = st2[0];
}

/* ---- codes and bucket sums ----------------------------------------------------------------- */

/* Step 3 of int8_format.py: float arithmetic (twice the SIMD width) whenever lo and scale are
 * comfortably inside the float range, double otherwise (subnormal or near-overflow chunks). */
static inline int float_codes(double lo, double scale) {
    return scale >= 0x1p-100 && scale <= 0x1p100 && fabs(lo) <= 0x1p100;
}

static inline uint8_t code_of_f(float x, float lo, float scale) {
    float t = (x - lo) * scale;
    t = t > 0.0f ? t : 0.0f;
    t = t < 255.0f ? t : 255.0f;
    return (uint8_t)(int32_t)t;
}

static inline uint8_t code_of_d(float x, double lo, double scale) {
    double t = ((double)x - lo) * scale;
    t = t > 0.0 ? t : 0.0;
    t = t < 255.0 ? t : 255.0;
    return (uint8_t)(int32_t)t;
}

/* Codes for n values; the vector paths compute the same values as code_of_*, lane by lane. */
static inline void codes_of(const float *x, int64_t n, double lo, double scale, uint8_t *codes) {
    int64_t i = 0;
    if (float_codes(lo, scale)) {
        const float lo_f = (float)lo, scale_f = (float)scale;
#if defined(__AVX2__)
        const __m256 vlo = _mm256_set1_ps(lo_f), vsc = _mm256_set1_ps(scale_f);
        const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f);
        /* packs interleave 128-bit lanes; this permutation restores element order */
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        __m256i c8[4];
        for (; i + 32 <= n; i += 32) {
            for (int k = 0; k < 4; k++) {
                __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8 * k), vlo), vsc);
                c8[k] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t, zero), top));
            }
            __m256i p = _mm256_packus_epi16(_mm256_packs_epi32(c8[0], c8[1]), _mm256_packs_epi32(c8[2], c8[3]));
            _mm256_storeu_si256((__m256i *)(codes + i), _mm256_permutevar8x32_epi32(p, order));
        }
#endif
        for (; i < n; i++) codes[i] = code_of_f(x[i], lo_f, scale_f);
        return;
    }
#if defined(__AVX2__)
    const __m256d vlo = _mm256_set1_pd(lo), vsc = _mm256_set1_pd(scale);
    const __m256d zero = _mm256_setzero_pd(), top = _mm256_set1_pd(255.0);
    __m128i c4[4];
    for (; i + 16 <= n; i += 16) {
        for (int k = 0; k < 4; k++) {
            __m256d t = _mm256_mul_pd(_mm256_sub_pd(load4d(x + i + 4 * k), vlo), vsc);
            c4[k] = _mm256_cvttpd_epi32(_mm256_min_pd(_mm256_max_pd(t, zero), top));
        }
        __m128i lo16 = _mm_packs_epi32(c4[0], c4[1]), hi16 = _mm_packs_epi32(c4[2], c4[3]);
        _mm_storeu_si128((__m128i *)(codes + i), _mm_packus_epi16(lo16, hi16));
    }
#endif
    for (; i < n; i++) codes[i] = code_of_d(x[i], lo, scale);
}

/* Per-bucket (sum, count) pairs in one 16-byte add: one store per value instead of two. */
typedef double pair_d __attribute__((vector_size(16)));

static inline void histogram_add(const float *x, const uint8_t *codes, int64_t n, pair_d (*h)[NB]) {
    int64_t i = 0;
#if defined(__AVX2__) && N_SUB == 4
    /* Four (x, 1.0) pairs from one widening load and two unpacks each half. */
    const __m128d one = _mm_set1_pd(1.0);
    for (; i + 4 <= n; i += 4) {
        __m256d xd = load4d(x + i);
        __m128d a = _mm256_castpd256_pd128(xd), b = _mm256_extractf128_pd(xd, 1);
        h[0][codes[i]] += (pair_d)_mm_unpacklo_pd(a, one);
        h[1][codes[i + 1]] += (pair_d)_mm_unpackhi_pd(a, one);
        h[2][codes[i + 2]] += (pair_d)_mm_unpacklo_pd(b, one);
        h[3][codes[i + 3]] += (pair_d)_mm_unpackhi_pd(b, one);
    }
#endif
    for (; i + N_SUB <= n; i += N_SUB)
        for (int s = 0; s < N_SUB; s++) {
            pair_d v = {(double)x[i + s], 1.0};
            h[s][codes[i + s]] += v;
        }
    for (; i < n; i++) {
        pair_d v = {(double)x[i], 1.0};
        h[0][codes[i]] += v;
    }
}

/* ---- quantize ------------------------------------------------------------------------------ */

typedef struct {
    const float *x;
    int64_t n, chunk;
    uint8_t *codes;
    unsigned char *codebooks; /* n_chunks * NB fp32, possibly unaligned (inside a bytes object) */
    double *stats;            /* optional: mean, std, lo, scale per chunk */
    int64_t first_bad;        /* smallest chunk with a non-finite value, or -1 */
} quant_ctx;

static void note_bad_chunk(quant_ctx *q, int64_t c) {
    int64_t seen = __atomic_load_n(&q->first_bad, __ATOMIC_RELAXED);
    while ((seen < 0 || c < seen) &&
           !__atomic_compare_exchange_n(&q->first_bad, &seen, c, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

static void quantize_chunk(void *arg, int64_t c) {
    quant_ctx *q = (quant_ctx *)arg;
    int64_t start = c * q->chunk, n = q->n - start;
    if (n > q->chunk) n = q->chunk;
    const float *x = q->x + start;
    uint8_t *codes = q->codes + start;
    float cb[NB];

    double s1, s2;
    chunk_sums(x, n, &s1, &s2);
    if (!isfinite(s1) || !isfinite(s2)) {
        /* Finite floats cannot overflow these sums, so this is a NaN/Inf in the input. */
        note_bad_chunk(q, c);
        return;
    }
    const double x0 = (double)x[0];
    double m1 = s1 / (double)n;
    double mean = x0 + m1;
    double var = s2 / (double)n - m1 * m1;
    if (!(var > 0.0)) var = 0.0;
    double std = sqrt(var);
    double lo = x0, scale = 0.0;
    if (std != 0.0) {
        lo = mean - 6.0 * std;
        scale = 256.0 / (12.0 * std);
    }
    if (q->stats) {
        q->stats[4 * c + 0] = mean;
        q->stats[4 * c + 1] = std;
        q->stats[4 * c + 2] = lo;
        q->stats[4 * c + 3] = scale;
    }

    if (std == 0.0) {
        /* Constant chunk: one bucket holding the exact value, so it round-trips bit for bit. */
        memset(codes, 0, (size_t)n);
        for (int k = 0; k < NB; k++) cb[k] = x[0];
        memcpy(q->codebooks + (size_t)c * NB * sizeof(float), cb, sizeof cb);
        return;
    }

    pair_d h[N_SUB][NB];
    memset(h, 0, sizeof h);
    /* Codes and histogram per L1-sized piece, so the histogram re-reads x and codes from L1.
     * (Walking the chunk back to front to reuse the tail the statistics pass left in L2 measured
     * ~10% slower: the hardware prefetchers prefer ascending streams.) */
    for (int64_t i = 0; i < n; i += PIECE) {
        int64_t len = n - i < PIECE ? n - i : PIECE;
        codes_of(x + i, len, lo, scale, codes + i);
        histogram_add(x + i, codes + i, len, h);
    }
    for (int k = 0; k < NB; k++) {
        pair_d t = h[0][k];
        for (int s = 1; s < N_SUB; s++) t += h[s][k];
        double v;
        if (t[1] > 0.0) {
            v = t[0] / t[1];
        } else {
            v = lo + ((double)k + 0.5) / scale;
            v = v < -FLT_MAX ? -FLT_MAX : (v > FLT_MAX ? FLT_MAX : v);
        }
        cb[k] = (float)v;
    }
    memcpy(q->codebooks + (size_t)c * NB * sizeof(float), cb, sizeof cb);
}

/* Returns -1 on success, the index of the first chunk holding NaN/Inf, or -2 on bad arguments. */
int64_t p2pq_quantize(const float *x, int64_t n, int64_t chunk, uint8_t *codes, unsigned char *codebooks,
                      double *stats, int n_threads) {
    if (n < 0 || chunk < BLOCK || (chunk & (chunk - 1))) return -2;
    if (n == 0) return -1;
    quant_ctx q = {x, n, chunk, codes, codebooks, stats, -1};
    run_chunks(quantize_chunk, &q, (n + chunk - 1) / chunk, n_threads);
    return q.first_bad;
}

/* ---- dequantize / decode-and-accumulate ----------------------------------------------------- */

typedef struct {
    const uint8_t *codes;
    const unsigned char *codebooks;
    int64_t n, chunk;
    float weight;
    float *out;
} dequant_ctx;

static void dequantize_chunk(void *arg, int64_t c) {
    dequant_ctx *d = (dequant_ctx *)arg;
    int64_t start = c * d->chunk, n = d->n - start;
    if (n > d->chunk) n = d->chunk;
    const uint8_t *codes = d->codes + start;
    float *out = d->out + start;
    float cb[NB];
    memcpy(cb, d->codebooks + (size_t)c * NB * sizeof(float), sizeof cb);
    for (int64_t i = 0; i < n; i++) out[i] = cb[codes[i]];
}

static void accumulate_chunk(void *arg, int64_t c) {
    dequant_ctx *d = (dequant_ctx *)arg;
    int64_t start = c * d->chunk, n = d->n - start;
    if (n > d->chunk) n = d->chunk;
    const uint8_t *codes = d->codes + start;
    float *out = d->out + start;
    float cb[NB];
    memcpy(cb, d->codebooks + (size_t)c * NB * sizeof(float), sizeof cb);
    /* weight * cb[k] rounded to fp32 once per bucket gives the same bits as per element. */
    for (int k = 0; k < NB; k++) cb[k] = d->weight * cb[k];
    for (int64_t i = 0; i < n; i++) out[i] = out[i] + cb[codes[i]];
}

int p2pq_dequantize(const uint8_t *codes, const unsigned char *codebooks, int64_t n, int64_t chunk, float *out,
                    int n_threads) {
    if (n < 0 || chunk < 1) return -2;
    dequant_ctx d = {codes, codebooks, n, chunk, 1.0f, out};
    run_chunks(dequantize_chunk, &d, (n + chunk - 1) / chunk, n_threads);
    return 0;
}

int p2pq_decode_accumulate(const uint8_t *codes, const unsigned char *codebooks, int64_t n, int64_t chunk,
                           float weight, float *out, int n_threads) {
    if (n < 0 || chunk < 1) return -2;
    dequant_ctx d = {codes, codebooks, n, chunk, weight, out};
    run_chunks(accumulate_chunk, &d, (n + chunk - 1) / chunk, n_threads);
    return 0;
}
