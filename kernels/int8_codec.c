/*
 * int8 pseudo-gradient codec: chunked quantize, dequantize and fused decode-and-accumulate.
 *
 * The arithmetic is specified in p2p_trainer/codec/int8_format.py and mirrored exactly by
 * p2p_trainer/codec/reference.py: codes must match bit for bit, so every floating point
 * operation here has a fixed order, and the file must be built with -ffp-contract=off and
 * without -ffast-math (a fused multiply-add or a reassociated sum would change the codes).
 *
 * Chunks are independent, so threads take whole chunks from a shared counter.
 * Loaded with ctypes; all pointers are to contiguous little-endian buffers. Every entry point takes
 * the byte length of every buffer it touches and checks sizes, header and offsets against them
 * before reading or writing anything: the Python side validates too, but a payload comes from
 * another peer and this code must not depend on its caller having done so.
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
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the payload is little endian and is read in place"
#endif

#define P2PQ_ABI_VERSION 2
#define NB 256
#define BLOCK 64
#define MAX_THREADS 256
#define N_SUB 4    /* interleaved histograms: consecutive values often share a bucket */
#define PIECE 1024 /* values coded then histogrammed together while in L1 */
#define MIN_CHUNK BLOCK
#define MAX_CHUNK (1 << 24)
#define HEADER_BYTES 24
#define CODEBOOK_BYTES (NB * 4)
#define VERSION 1

/* Error codes; int8_format.NATIVE_ERRORS holds the matching messages. */
enum {
    P2PQ_OK = 0,
    P2PQ_EARGS = -2,     /* null pointer, negative or non-whole-float length, threads < 1, bad weight */
    P2PQ_ESHORT = -3,    /* payload shorter than its header */
    P2PQ_EMAGIC = -4,    /* not "P2Q8" */
    P2PQ_EVERSION = -5,  /* format version other than 1 */
    P2PQ_ERESERVED = -6, /* flags or reserved header bytes not zero */
    P2PQ_ENUMEL = -7,    /* header numel differs from the output buffer's value count */
    P2PQ_ECHUNK = -8,    /* chunk size not a power of two in [64, 2^24] */
    P2PQ_ENCHUNKS = -9,  /* header chunk count differs from ceil(numel / chunk) */
    P2PQ_ELENGTH = -10,  /* payload length differs from the size the header implies */
    P2PQ_ECODEBOOK = -11, /* a codebook entry is NaN or Inf */
    P2PQ_EOUT = -12,     /* an output buffer's length does not match the input */
};

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

/* Threads take whole chunks from a counter, so a thread the OS delays (2 shared cores) just takes
 * fewer chunks; a static split would leave the other core idle at the end. */
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

/* The statistics pass streams each chunk from memory, and this machine's hardware prefetcher alone
 * left it ~40% slower than from cache; asking for the lines 4 KiB ahead closes the gap. Prefetches
 * never fault, so an address past the end of the buffer is harmless (computed as an integer, since
 * a pointer that far past an array is undefined in C). */
#define PREFETCH_AHEAD 4096
static inline void prefetch_lines(const void *p, int bytes, int for_write) {
    uintptr_t at = (uintptr_t)p + PREFETCH_AHEAD;
    for (int k = 0; k < bytes; k += 64) {
        if (for_write)
            __builtin_prefetch((const void *)(at + (uintptr_t)k), 1, 3);
        else
            __builtin_prefetch((const void *)(at + (uintptr_t)k), 0, 3);
    }
}

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
                prefetch_lines(x + b * BLOCK, BLOCK * 4, 0);
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

/* Per-bucket (sum, count) pairs in one 16-byte add: one load and one store per value, which is
 * what bounds this loop (Zen issues two memory operations per cycle, at most one a store). */
typedef double pair_d __attribute__((vector_size(16)));

static inline void histogram_add(const float *x, const uint8_t *codes, int64_t n, pair_d (*h)[NB]) {
    int64_t i = 0;
#if defined(__AVX2__) && N_SUB == 4
    /* Eight codes from one load, eight (x, 1.0) pairs from two widening loads and unpacks. */
    const __m128d one = _mm_set1_pd(1.0);
    for (; i + 8 <= n; i += 8) {
        uint64_t c;
        memcpy(&c, codes + i, 8);
        __m256d xa = load4d(x + i), xb = load4d(x + i + 4);
        __m128d a0 = _mm256_castpd256_pd128(xa), a1 = _mm256_extractf128_pd(xa, 1);
        __m128d b0 = _mm256_castpd256_pd128(xb), b1 = _mm256_extractf128_pd(xb, 1);
        h[0][c & 255] += (pair_d)_mm_unpacklo_pd(a0, one);
        h[1][(c >> 8) & 255] += (pair_d)_mm_unpackhi_pd(a0, one);
        h[2][(c >> 16) & 255] += (pair_d)_mm_unpacklo_pd(a1, one);
        h[3][(c >> 24) & 255] += (pair_d)_mm_unpackhi_pd(a1, one);
        h[0][(c >> 32) & 255] += (pair_d)_mm_unpacklo_pd(b0, one);
        h[1][(c >> 40) & 255] += (pair_d)_mm_unpackhi_pd(b0, one);
        h[2][(c >> 48) & 255] += (pair_d)_mm_unpacklo_pd(b1, one);
        h[3][c >> 56] += (pair_d)_mm_unpackhi_pd(b1, one);
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
        memcpy(q->codebooks + (size_t)c * CODEBOOK_BYTES, cb, sizeof cb);
        return;
    }

    pair_d h[N_SUB][NB];
    memset(h, 0, sizeof h);
    /* Codes, then the histogram, one L1-sized piece at a time: the histogram re-reads x and the
     * codes from L1. (One fused loop that sends each code from a register to its bucket measured
     * ~40% slower on Zen: its long per-value dependency chain outgrows the out-of-order window.) */
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
    memcpy(q->codebooks + (size_t)c * CODEBOOK_BYTES, cb, sizeof cb);
}

static int valid_chunk(int64_t chunk) { return chunk >= MIN_CHUNK && chunk <= MAX_CHUNK && !(chunk & (chunk - 1)); }

static int64_t chunk_count(int64_t n, int64_t chunk) { return n / chunk + (n % chunk != 0); }

/* Returns -1 on success, the index of the first chunk holding NaN/Inf, or a P2PQ_E* code. Lengths are
 * in bytes: x holds x_bytes / 4 values, codes must hold one byte per value, codebooks 1 KiB per
 * chunk, stats (optional, NULL) 32 bytes per chunk. */
int64_t p2pq_quantize(const float *x, int64_t x_bytes, int64_t chunk, uint8_t *codes, int64_t codes_bytes,
                      unsigned char *codebooks, int64_t codebooks_bytes, double *stats, int64_t stats_bytes,
                      int n_threads) {
    if (x_bytes < 0 || x_bytes % 4 || n_threads < 1) return P2PQ_EARGS;
    if (!valid_chunk(chunk)) return P2PQ_ECHUNK;
    int64_t n = x_bytes / 4, chunks = chunk_count(n, chunk), books;
    if (__builtin_mul_overflow(chunks, (int64_t)CODEBOOK_BYTES, &books)) return P2PQ_EARGS;
    if (codes_bytes != n || codebooks_bytes != books) return P2PQ_EOUT;
    if (stats && stats_bytes != chunks * 4 * (int64_t)sizeof(double)) return P2PQ_EOUT;
    if (n == 0) return -1;
    if (!x || !codes || !codebooks) return P2PQ_EARGS;
    quant_ctx q = {x, n, chunk, codes, codebooks, stats, -1};
    run_chunks(quantize_chunk, &q, chunks, n_threads);
    return q.first_bad;
}

static void put_u16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static void put_u32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

/* A whole payload (int8_format.py): header, codebooks, codes. payload_bytes must be its exact size.
 * Same return values as p2pq_quantize; on a non-finite input the payload's contents are undefined. */
int64_t p2pq_encode(const float *x, int64_t x_bytes, int64_t chunk, unsigned char *payload, int64_t payload_bytes,
                    int n_threads) {
    if (x_bytes < 0 || x_bytes % 4 || n_threads < 1 || !payload || payload_bytes < 0 || (x_bytes && !x))
        return P2PQ_EARGS;
    if (!valid_chunk(chunk)) return P2PQ_ECHUNK;
    int64_t n = x_bytes / 4, chunks = chunk_count(n, chunk);
    if (chunks > UINT32_MAX) return P2PQ_ENCHUNKS; /* the header's field is 32 bits */
    if (payload_bytes != HEADER_BYTES + chunks * CODEBOOK_BYTES + n) return P2PQ_EOUT;
    memcpy(payload, "P2Q8", 4);
    payload[4] = VERSION;
    payload[5] = 0;
    put_u16(payload + 6, 0);
    put_u64(payload + 8, (uint64_t)n);
    put_u32(payload + 16, (uint32_t)chunk);
    put_u32(payload + 20, (uint32_t)chunks);
    unsigned char *books = payload + HEADER_BYTES;
    uint8_t *codes = books + chunks * CODEBOOK_BYTES;
    return p2pq_quantize(x, x_bytes, chunk, codes, n, books, chunks * CODEBOOK_BYTES, NULL, 0, n_threads);
}

/* ---- parsing an untrusted payload ------------------------------------------------------------ */

typedef struct {
    int64_t numel, chunk, n_chunks;
    const unsigned char *codebooks;
    const uint8_t *codes;
} payload_view;

/* Every check of int8_format.parse, in the same order, before any byte past the header is read.
 * numel is what the caller's output holds; all sizes are computed with overflow checks. */
static int parse_payload(const unsigned char *p, int64_t len, int64_t numel, payload_view *v) {
    uint64_t h_numel;
    uint32_t h_chunk, h_chunks;
    uint16_t reserved;
    if (len < HEADER_BYTES) return P2PQ_ESHORT;
    if (memcmp(p, "P2Q8", 4) != 0) return P2PQ_EMAGIC;
    if (p[4] != VERSION) return P2PQ_EVERSION;
    memcpy(&reserved, p + 6, 2);
    if (p[5] != 0 || reserved != 0) return P2PQ_ERESERVED;
    memcpy(&h_numel, p + 8, 8);
    memcpy(&h_chunk, p + 16, 4);
    memcpy(&h_chunks, p + 20, 4);
    if (h_numel != (uint64_t)numel) return P2PQ_ENUMEL;
    if (!valid_chunk(h_chunk)) return P2PQ_ECHUNK;
    int64_t chunks = chunk_count(numel, h_chunk), books, total;
    if ((uint64_t)chunks != h_chunks) return P2PQ_ENCHUNKS;
    if (__builtin_mul_overflow(chunks, (int64_t)CODEBOOK_BYTES, &books) ||
        __builtin_add_overflow(books, (int64_t)HEADER_BYTES, &total) ||
        __builtin_add_overflow(total, numel, &total) || total != len)
        return P2PQ_ELENGTH;
    /* Checked up front, so a bad chunk late in the payload leaves the output untouched. */
    const unsigned char *cb = p + HEADER_BYTES;
    for (int64_t i = 0; i < chunks * NB; i++) {
        uint32_t bits;
        memcpy(&bits, cb + 4 * i, 4);
        if ((bits & 0x7f800000u) == 0x7f800000u) return P2PQ_ECODEBOOK;
    }
    v->numel = numel;
    v->chunk = h_chunk;
    v->n_chunks = chunks;
    v->codebooks = cb;
    v->codes = cb + books;
    return P2PQ_OK;
}

/* ---- dequantize / decode-and-accumulate ----------------------------------------------------- */

typedef struct {
    payload_view v;
    float weight;
    float *out;
} dequant_ctx;

#if defined(__AVX2__)
/* 8 codebook entries picked by 8 codes: scalar loads straight into vector lanes. This beats
 * vpgatherdd on Zen (microcoded there) and matches it on Intel. */
static inline __m256 lookup8(const float *cb, uint64_t c) {
    __m128 lo = _mm_setr_ps(cb[c & 255], cb[(c >> 8) & 255], cb[(c >> 16) & 255], cb[(c >> 24) & 255]);
    __m128 hi = _mm_setr_ps(cb[(c >> 32) & 255], cb[(c >> 40) & 255], cb[(c >> 48) & 255], cb[c >> 56]);
    return _mm256_set_m128(hi, lo);
}
#endif

static void load_codebook(const dequant_ctx *d, int64_t c, float *cb, int64_t *start, int64_t *n) {
    *start = c * d->v.chunk;
    *n = d->v.numel - *start < d->v.chunk ? d->v.numel - *start : d->v.chunk;
    memcpy(cb, d->v.codebooks + (size_t)c * CODEBOOK_BYTES, CODEBOOK_BYTES);
}

static void dequantize_chunk(void *arg, int64_t c) {
    dequant_ctx *d = (dequant_ctx *)arg;
    float cb[NB];
    int64_t start, n, i = 0;
    load_codebook(d, c, cb, &start, &n);
    const uint8_t *codes = d->v.codes + start;
    float *out = d->out + start;
#if defined(__AVX2__)
    if (((uintptr_t)out & 31) == 0) {
        /* The output is new memory nobody reads soon: streaming stores skip reading each line into
         * the cache before overwriting it (4 of the 9 bytes a value would otherwise move). */
        for (; i + 8 <= n; i += 8) {
            uint64_t c8;
            memcpy(&c8, codes + i, 8);
            _mm256_stream_ps(out + i, lookup8(cb, c8));
        }
        _mm_sfence();
    } else {
        for (; i + 8 <= n; i += 8) { /* streaming stores need 32-byte alignment */
            uint64_t c8;
            memcpy(&c8, codes + i, 8);
            _mm256_storeu_ps(out + i, lookup8(cb, c8));
        }
    }
#endif
    for (; i < n; i++) out[i] = cb[codes[i]];
}

static void accumulate_chunk(void *arg, int64_t c) {
    dequant_ctx *d = (dequant_ctx *)arg;
    float cb[NB];
    int64_t start, n, i = 0;
    load_codebook(d, c, cb, &start, &n);
    const uint8_t *codes = d->v.codes + start;
    float *out = d->out + start;
    /* weight * cb[k] rounded to fp32 once per bucket gives the same bits as per element. */
    for (int k = 0; k < NB; k++) cb[k] = d->weight * cb[k];
#if defined(__AVX2__)
    for (; i + 64 <= n; i += 64) {
        /* out 4 KiB ahead (~25% faster from memory); prefetching the codes too measured slower. */
        prefetch_lines(out + i, 64 * 4, 1);
        for (int j = 0; j < 64; j += 8) {
            uint64_t c8;
            memcpy(&c8, codes + i + j, 8);
            _mm256_storeu_ps(out + i + j, _mm256_add_ps(_mm256_loadu_ps(out + i + j), lookup8(cb, c8)));
        }
    }
#endif
    for (; i < n; i++) out[i] = out[i] + cb[codes[i]];
}

static int decode_into(const unsigned char *payload, int64_t payload_bytes, float *out, int64_t out_bytes,
                       float weight, chunk_fn fn, int n_threads) {
    if (!payload || payload_bytes < 0 || out_bytes < 0 || out_bytes % 4 || n_threads < 1 || !isfinite(weight))
        return P2PQ_EARGS;
    if (!out && out_bytes) return P2PQ_EARGS;
    dequant_ctx d = {{0}, weight, out};
    int rc = parse_payload(payload, payload_bytes, out_bytes / 4, &d.v);
    if (rc != P2PQ_OK) return rc;
    run_chunks(fn, &d, d.v.n_chunks, n_threads);
    return P2PQ_OK;
}

/* out[i] = codebook[chunk(i)][code[i]] for the out_bytes / 4 values the payload must hold. */
int p2pq_dequantize(const unsigned char *payload, int64_t payload_bytes, float *out, int64_t out_bytes,
                    int n_threads) {
    return decode_into(payload, payload_bytes, out, out_bytes, 1.0f, dequantize_chunk, n_threads);
}

/* out[i] = out[i] + float(weight * codebook[chunk(i)][code[i]]): a multiply then an add, no FMA. */
int p2pq_decode_accumulate(const unsigned char *payload, int64_t payload_bytes, float weight, float *out,
                           int64_t out_bytes, int n_threads) {
    return decode_into(payload, payload_bytes, out, out_bytes, weight, accumulate_chunk, n_threads);
}
