/*
 * Sparse pseudo-gradient codec: per chunk, top-k selection by magnitude, low-bit magnitude levels,
 * Elias-Fano indices (bit-packed (low index bits, code) slots and a unary high bitmap); decode and
 * fused decode-and-accumulate with full validation.
 *
 * The arithmetic and the payload layout are specified in p2p_trainer/codec/sparse_format.py and
 * mirrored by p2p_trainer/codec/sparse_reference.py: the two must produce the same payload bytes,
 * so selection works on integer keys (the float bits without the sign: integer order is magnitude
 * order, subnormals included), every double operation has a fixed order, and the file is built
 * with -ffp-contract=off and without -ffast-math.
 *
 * Every entry point takes the lengths of the buffers it touches and refuses (-2) parameters that
 * do not give exactly those lengths. Chunks are independent: threads take whole chunks.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float/double expressions must be evaluated in their own precision (FLT_EVAL_METHOD 0)"
#endif

#define P2PS_ABI_VERSION 2
#define HEADER_SIZE 32
#define MIN_CHUNK 64
#define MAX_CHUNK 65536
#define MAX_BITS 8
#define MAX_LEVELS (1 << (MAX_BITS - 1))
#define MAX_NUMEL (1LL << 40)
#define MAX_THREADS 256
#define SERIAL_BELOW (1 << 17) /* values: smaller tensors are not worth starting threads for */

#define ERR_ARGS (-2)
#define ERR_MEMORY (-3)

int p2ps_abi_version(void) { return P2PS_ABI_VERSION; }

/* ---- layout: sparse_format.layout(), field for field ---------------------------------------- */

/* one chunk's block: sparse_format.Block */
typedef struct {
    int64_t n, kc, slot_bits_total, bitmap_bits, size;
    int low_bits, slot_bits;
} block_layout;

typedef struct {
    int64_t n, chunk, k, n_chunks;
    int64_t levels_off, counts_off, slots_off, size;
    int bits, n_levels;
    block_layout full, last;
} layout;

static void make_block(int64_t n, int64_t kc, int bits, block_layout *b) {
    int low = 0;
    while ((n / kc) >> (low + 1)) low++; /* floor(log2(n / kc)) */
    b->n = n;
    b->kc = kc;
    b->low_bits = low;
    b->slot_bits = low + bits;
    b->slot_bits_total = kc * b->slot_bits;
    b->bitmap_bits = ((n - 1) >> low) + 1 + kc;
    b->size = (b->slot_bits_total + b->bitmap_bits + 7) / 8;
}

static int make_layout(int64_t n, int64_t chunk, int64_t k, int bits, layout *l) {
    if (n < 0 || n > MAX_NUMEL || chunk < MIN_CHUNK || chunk > MAX_CHUNK || (chunk & (chunk - 1)) ||
        k < 1 || k > chunk / 2 || bits < 1 || bits > MAX_BITS)
        return -1;
    memset(l, 0, sizeof *l);
    l->n = n;
    l->chunk = chunk;
    l->k = k;
    l->bits = bits;
    l->n_levels = 1 << (bits - 1);
    l->n_chunks = (n + chunk - 1) / chunk;
    make_block(chunk, k, bits, &l->full);
    if (l->n_chunks) {
        const int64_t last_n = n - (l->n_chunks - 1) * chunk;
        make_block(last_n, k < last_n ? k : last_n, bits, &l->last);
    }
    l->levels_off = HEADER_SIZE;
    l->counts_off = l->levels_off + 4 * (int64_t)l->n_levels * l->n_chunks;
    l->slots_off = l->counts_off + 2 * l->n_chunks;
    l->size = l->slots_off + (l->n_chunks ? l->full.size * (l->n_chunks - 1) + l->last.size : 0);
    return 0;
}

static inline const block_layout *block_of(const layout *l, int64_t c) {
    return c == l->n_chunks - 1 ? &l->last : &l->full;
}
static inline int64_t block_offset(const layout *l, int64_t c) { return l->slots_off + c * l->full.size; }

/* ---- threading: a pool-less fork/join over chunk indices, with per-thread scratch ------------- */

typedef void (*chunk_fn)(void *ctx, int64_t chunk_index, void *scratch);

typedef struct {
    chunk_fn fn;
    void *ctx;
    int64_t n_chunks;
    size_t scratch_bytes;
    int64_t next; /* atomically incremented */
    int64_t done; /* chunks processed, atomically incremented */
} fork_job;

static void *fork_worker(void *arg) {
    fork_job *job = (fork_job *)arg;
    void *scratch = NULL;
    if (job->scratch_bytes && !(scratch = aligned_alloc(64, (job->scratch_bytes + 63) & ~(size_t)63)))
        return NULL; /* the other threads take its chunks; none left at all is reported as ERR_MEMORY */
    for (;;) {
        int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (c >= job->n_chunks) break;
        job->fn(job->ctx, c, scratch);
        __atomic_fetch_add(&job->done, 1, __ATOMIC_RELAXED);
    }
    free(scratch);
    return NULL;
}

/* Returns 0, or ERR_MEMORY if not even one thread could allocate its scratch. */
static int run_chunks(chunk_fn fn, void *ctx, int64_t n_chunks, size_t scratch_bytes, int n_threads,
                      int64_t n_values) {
    fork_job job = {fn, ctx, n_chunks, scratch_bytes, 0, 0};
    pthread_t tid[MAX_THREADS];
    int started = 0;
    if (n_values < SERIAL_BELOW || n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n_chunks) n_threads = (int)n_chunks;
    for (int t = 1; t < n_threads; t++)
        if (pthread_create(&tid[started], NULL, fork_worker, &job) == 0) started++;
    fork_worker(&job);
    for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
    return job.done == n_chunks ? 0 : ERR_MEMORY;
}

/* ---- bit streams ---------------------------------------------------------------------------- */

typedef struct {
    uint8_t *p;
    uint64_t acc;
    int n;
} bit_writer;

static inline void put_bits(bit_writer *w, uint32_t v, int bits) {
    w->acc |= (uint64_t)v << w->n;
    w->n += bits;
    while (w->n >= 8) {
        *w->p++ = (uint8_t)w->acc;
        w->acc >>= 8;
        w->n -= 8;
    }
}

static inline void put_zeros(bit_writer *w, int64_t bits) {
    for (; bits > 24; bits -= 24) put_bits(w, 0, 24);
    put_bits(w, 0, (int)bits);
}

static inline void flush_bits(bit_writer *w) {
    if (w->n > 0) *w->p++ = (uint8_t)w->acc;
    w->acc = 0;
    w->n = 0;
}

typedef struct {
    const uint8_t *p, *end;
    uint64_t acc;
    int n;
} bit_reader;

/* A reader of the bits from bit `at` of `p` on. */
static inline bit_reader reader_at(const uint8_t *p, int64_t at) {
    bit_reader r = {p + at / 8, NULL, 0, 0};
    if (at % 8) {
        r.acc = (uint64_t)(*r.p++) >> (at % 8);
        r.n = 8 - (int)(at % 8);
    }
    return r;
}

/* The caller has checked that the block holds every bit it reads (bits <= 32). */
static inline uint32_t get_bits(bit_reader *r, int bits) {
    while (r->n < bits) {
        r->acc |= (uint64_t)(*r->p++) << r->n;
        r->n += 8;
    }
    uint32_t v = (uint32_t)(r->acc & ((1ULL << bits) - 1));
    r->acc >>= bits;
    r->n -= bits;
    return v;
}

/* ---- selection: the kc largest keys, ties to the lower index ---------------------------------- */

/* key(i): the float bits without the sign; for non-negative floats integer order is magnitude order */
static inline uint32_t key_of(const float *x, int64_t i) {
    uint32_t u;
    memcpy(&u, x + i, 4);
    return u & 0x7fffffffu;
}

typedef struct {
    uint32_t *cand; /* entries that may be kept, in increasing index order (+8 slack for vector stores) */
    uint32_t *work; /* the radix select's shrinking candidate set */
    uint16_t *sel;  /* kept indices, increasing */
} scratch_t;

static size_t scratch_size(int64_t chunk) { return (size_t)(chunk + 8) * 4 + (size_t)chunk * 4 + (size_t)chunk * 2; }

static scratch_t scratch_of(void *p, int64_t chunk) {
    scratch_t s;
    s.cand = (uint32_t *)p;
    s.work = s.cand + chunk + 8;
    s.sel = (uint16_t *)(s.work + chunk);
    return s;
}

#define N_SAMPLE 256

/* A lower bound guess for the kc-th largest key, from N_SAMPLE evenly spaced keys (one per cache
 * line at the default chunk size, so it also brings the chunk into L1): the r-th largest sample,
 * with r about twice the expected count of kept entries in the sample plus a margin. Only speed
 * depends on it: a guess that is too high is detected and replaced by an exact fallback. */
static uint32_t sample_threshold(const float *x, int64_t n, int64_t kc) {
    uint32_t top[N_SAMPLE];
    int r = (int)(2 * ((kc * N_SAMPLE + n - 1) / n) + 8), have = 0;
    if (r > N_SAMPLE) r = N_SAMPLE;
    const int64_t stride = n / N_SAMPLE;
    for (int j = 0; j < N_SAMPLE; j++) {
        uint32_t v = key_of(x, j * stride + stride / 2);
        if (have == r && v <= top[r - 1]) continue;
        int i = have < r ? have++ : r - 1; /* insert into the descending top-r list */
        while (i > 0 && top[i - 1] < v) {
            top[i] = top[i - 1];
            i--;
        }
        top[i] = v;
    }
    return top[r - 1];
}

#if defined(__AVX2__)
static uint64_t lane_lut[256]; /* byte j: the lane of the j-th set bit of the mask */
static pthread_once_t lane_lut_once = PTHREAD_ONCE_INIT;

static void init_lane_lut(void) {
    for (int mask = 0; mask < 256; mask++) {
        uint64_t v = 0;
        int j = 0;
        for (int lane = 0; lane < 8; lane++)
            if (mask >> lane & 1) v |= (uint64_t)lane << (8 * j++);
        lane_lut[mask] = v;
    }
}
#endif

/* Indices of the keys >= t (t >= 1) in increasing order into cand; returns how many, and the
 * largest key of the chunk in *max_key (>= 0x7f800000: a NaN or Inf). One pass, branch free. */
static int64_t collect_at_least(const float *x, int64_t n, uint32_t t, uint32_t *cand, uint32_t *max_key) {
    int64_t m = 0, i = 0;
    uint32_t mx = 0;
#if defined(__AVX2__)
    /* keys < 2^31, so signed compares order them */
    const __m256i below = _mm256_set1_epi32((int)(t - 1)), abs_mask = _mm256_set1_epi32(0x7fffffff);
    const __m256i step = _mm256_set1_epi32(8);
    __m256i base = _mm256_setzero_si256(), vmax = _mm256_setzero_si256();
    for (; i + 8 <= n; i += 8) {
        __m256i kv = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), abs_mask);
        vmax = _mm256_max_epi32(vmax, kv);
        unsigned hit = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, below)));
        __m256i lanes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)lane_lut[hit]));
        _mm256_storeu_si256((__m256i *)(cand + m), _mm256_add_epi32(base, lanes));
        m += __builtin_popcount(hit);
        base = _mm256_add_epi32(base, step);
    }
    uint32_t lanes_max[8];
    _mm256_storeu_si256((__m256i *)lanes_max, vmax);
    for (int j = 0; j < 8; j++) mx = lanes_max[j] > mx ? lanes_max[j] : mx;
#endif
    for (; i < n; i++) {
        uint32_t kk = key_of(x, i);
        mx = kk > mx ? kk : mx;
        cand[m] = (uint32_t)i;
        m += kk >= t;
    }
    *max_key = mx;
    return m;
}

/* The digit holding the `need`-th largest key given a histogram; `*above` = count of larger digits. */
static inline int pick_digit(const uint32_t *hist, int n_digits, int64_t need, int64_t *above) {
    int64_t acc = 0;
    for (int d = n_digits - 1; d >= 0; d--) {
        if (acc + hist[d] >= need) {
            *above = acc;
            return d;
        }
        acc += hist[d];
    }
    *above = acc; /* unreachable when need <= the number of candidates */
    return 0;
}

/* Radix select among `n_cand` candidates (which hold the kc largest keys): returns the shift s and
 * prefix P such that the kept set is {key >> s > P} plus the first `*ties` (by index) of
 * {key >> s == P} -- exactly the top kc by (key desc, index asc). Digits of 8, 8, 8 and 7 bits; it
 * stops as soon as every remaining candidate is taken (shift 31: all candidates are kept). */
static void radix_select(const float *x, const uint32_t *cand, int64_t n_cand, int64_t kc, uint32_t *work,
                         int *shift_out, uint32_t *prefix_out, int64_t *ties_out) {
    static const int shifts[4] = {23, 15, 7, 0};
    static const int widths[4] = {8, 8, 8, 7};
    const uint32_t *set = cand;
    int64_t need = kc, above;
    uint32_t prefix = 0;
    int shift = 31;
    for (int level = 0; level < 4 && n_cand > need; level++) {
        uint32_t hist[256];
        const int s = shifts[level];
        const uint32_t mask = (1u << widths[level]) - 1;
        memset(hist, 0, sizeof(uint32_t) * (mask + 1));
        for (int64_t j = 0; j < n_cand; j++) hist[(key_of(x, set[j]) >> s) & mask]++;
        int d = pick_digit(hist, (int)mask + 1, need, &above);
        need -= above;
        prefix = (prefix << widths[level]) | (uint32_t)d;
        shift = s;
        int64_t m = 0;
        for (int64_t j = 0; j < n_cand; j++) {
            uint32_t i = set[j];
            work[m] = i;
            m += ((key_of(x, i) >> s) & mask) == (uint32_t)d;
        }
        set = work;
        n_cand = m;
    }
    *shift_out = shift;
    *prefix_out = prefix;
    *ties_out = need;
}

/* The kept entries among the (index-ordered) candidates, zero keys left out; returns how many. */
static int64_t emit_kept(const float *x, const uint32_t *cand, int64_t n_cand, int shift, uint32_t prefix,
                         int64_t ties, uint16_t *sel) {
    int64_t m = 0;
    for (int64_t j = 0; j < n_cand; j++) {
        uint32_t kk = key_of(x, cand[j]);
        if (kk == 0) continue;
        uint32_t v = shift >= 31 ? 0 : kk >> shift;
        if (v > prefix) {
            sel[m++] = (uint16_t)cand[j];
        } else if (v == prefix && ties > 0) {
            ties--;
            sel[m++] = (uint16_t)cand[j];
        }
    }
    return m;
}

/* Step 1 of sparse_format: the kept indices of a chunk in increasing order; returns m, or -1 if the
 * chunk holds NaN/Inf. */
static int64_t select_chunk(const float *x, int64_t n, int64_t kc, scratch_t *s) {
    int64_t n_cand = 0;
    uint32_t t = 1, max_key = 0; /* t = 1: every non-zero entry is a candidate */
    if (n >= 4 * N_SAMPLE && 8 * kc <= n) {
        uint32_t guess = sample_threshold(x, n, kc);
        t = guess > 1 ? guess : 1;
    }
    n_cand = collect_at_least(x, n, t, s->cand, &max_key);
    if (max_key >= 0x7f800000u) return -1;
    if (n_cand < kc && t > 1) /* the guess was too high: every non-zero entry is a candidate */
        n_cand = collect_at_least(x, n, 1, s->cand, &max_key);
    if (n_cand < kc) { /* fewer non-zero entries than slots: all of them are kept */
        for (int64_t j = 0; j < n_cand; j++) s->sel[j] = (uint16_t)s->cand[j];
        return n_cand;
    }
    int shift;
    uint32_t prefix;
    int64_t ties;
    radix_select(x, s->cand, n_cand, kc, s->work, &shift, &prefix, &ties);
    return emit_kept(x, s->cand, n_cand, shift, prefix, ties, s->sel);
}

/* ---- encode ---------------------------------------------------------------------------------- */

typedef struct {
    const float *x;
    const layout *l;
    uint8_t *payload;
    int64_t first_bad; /* smallest chunk with a non-finite value, or -1 */
} enc_ctx;

static void note_bad_chunk(int64_t *first_bad, int64_t c) {
    int64_t seen = __atomic_load_n(first_bad, __ATOMIC_RELAXED);
    while ((seen < 0 || c < seen) &&
           !__atomic_compare_exchange_n(first_bad, &seen, c, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

static inline double magnitude(uint32_t key) {
    float f;
    memcpy(&f, &key, 4);
    return (double)f;
}

static void encode_chunk(void *arg, int64_t c, void *mem) {
    enc_ctx *e = (enc_ctx *)arg;
    const layout *l = e->l;
    scratch_t s = scratch_of(mem, l->chunk);
#if defined(__AVX2__)
    pthread_once(&lane_lut_once, init_lane_lut);
#endif
    const block_layout *b = block_of(l, c);
    const int64_t n = b->n, kc = b->kc;
    const float *x = e->x + c * l->chunk;
    const int L = l->n_levels;

    const int64_t m = select_chunk(x, n, kc, &s);
    if (m < 0) {
        note_bad_chunk(&e->first_bad, c);
        return;
    }

    /* steps 2 and 3: range, buckets and the level table */
    double lo = 0.0, hi = 0.0;
    if (m > 0) {
        lo = hi = magnitude(key_of(x, s.sel[0]));
        for (int64_t j = 1; j < m; j++) {
            double a = magnitude(key_of(x, s.sel[j]));
            lo = a < lo ? a : lo;
            hi = a > hi ? a : hi;
        }
    }
    const int spread = hi > lo;
    const double scale = spread ? (double)L / (hi - lo) : 0.0;
    double sums[MAX_LEVELS];
    int64_t counts[MAX_LEVELS];
    uint8_t q[MAX_CHUNK / 2];
    for (int j = 0; j < L; j++) {
        sums[j] = 0.0;
        counts[j] = 0;
    }
    for (int64_t j = 0; j < m; j++) {
        double a = magnitude(key_of(x, s.sel[j]));
        int b = 0;
        if (spread) {
            double t = (a - lo) * scale;
            b = t >= (double)(L - 1) ? L - 1 : (int)t;
        }
        q[j] = (uint8_t)b;
        sums[b] = sums[b] + a;
        counts[b]++;
    }
    float levels[MAX_LEVELS];
    for (int j = 0; j < L; j++)
        levels[j] = counts[j] > 0 ? (float)(sums[j] / (double)counts[j])
                                  : (float)(lo + ((hi - lo) * ((double)j + 0.5)) / (double)L);
    memcpy(e->payload + l->levels_off + 4 * (int64_t)L * c, levels, 4 * (size_t)L);
    uint16_t m16 = (uint16_t)m;
    memcpy(e->payload + l->counts_off + 2 * c, &m16, 2);

    /* steps 4 and 5: slots (low index bits, code), then the high bitmap */
    bit_writer w = {e->payload + block_offset(l, c), 0, 0};
    const uint32_t *xb = (const uint32_t *)x;
    const uint32_t low_mask = (1u << b->low_bits) - 1;
    for (int64_t j = 0; j < m; j++) {
        uint32_t bitsx;
        memcpy(&bitsx, xb + s.sel[j], 4);
        uint32_t code = (bitsx >> 31) | ((uint32_t)q[j] << 1);
        put_bits(&w, ((uint32_t)s.sel[j] & low_mask) | (code << b->low_bits), b->slot_bits);
    }
    put_zeros(&w, (kc - m) * b->slot_bits);
    int64_t at = 0; /* bits of the bitmap written so far */
    for (int64_t j = 0; j < m; j++) {
        int64_t one = ((int64_t)s.sel[j] >> b->low_bits) + j;
        put_zeros(&w, one - at);
        put_bits(&w, 1, 1);
        at = one + 1;
    }
    put_zeros(&w, b->bitmap_bits - at);
    flush_bits(&w);
}

/* Fills everything after the header of a payload of exactly `payload_len` bytes. Returns -1 on
 * success, the first chunk holding NaN/Inf, ERR_ARGS or ERR_MEMORY. */
int64_t p2ps_encode(const float *x, int64_t n, int64_t chunk, int64_t k, int bits, uint8_t *payload,
                    int64_t payload_len, int n_threads) {
    layout l;
    if (make_layout(n, chunk, k, bits, &l) || payload_len != l.size || !payload || (n > 0 && !x)) return ERR_ARGS;
    if (n == 0) return -1;
    enc_ctx e = {x, &l, payload, -1};
    if (run_chunks(encode_chunk, &e, l.n_chunks, scratch_size(chunk), n_threads, n)) return ERR_MEMORY;
    return e.first_bad;
}

/* ---- decode ---------------------------------------------------------------------------------- */

typedef struct {
    const layout *l;
    const uint8_t *payload;
    float *out;
    float weight;
    int accumulate;
    int64_t first_bad; /* smallest invalid chunk, or -1 */
} dec_ctx;

static inline int level_ok(uint32_t u) {
    /* finite and >= 0 (-0.0 included), like sparse_format.parse */
    uint32_t mag = u & 0x7fffffffu;
    return mag < 0x7f800000u && (!(u >> 31) || mag == 0);
}

/* Walks the ones of a block's high bitmap against its slots: calls `emit(ctx, idx, code)` for each
 * of the m entries in order and returns 0, or -1 as soon as anything breaks the format's rules
 * (ones != m, an index not strictly increasing or past n, a non-zero padding slot or tail bit). */
typedef void (*entry_fn)(void *ctx, uint32_t idx, uint32_t code);

static int walk_block(const uint8_t *block, const block_layout *b, int64_t m, entry_fn emit, void *ctx) {
    bit_reader slots = reader_at(block, 0), bitmap = reader_at(block, b->slot_bits_total);
    const uint32_t low_mask = (1u << b->low_bits) - 1;
    int64_t j = 0, prev = -1;
    for (int64_t base = 0; base < b->bitmap_bits; base += 32) {
        int width = b->bitmap_bits - base < 32 ? (int)(b->bitmap_bits - base) : 32;
        uint32_t word = get_bits(&bitmap, width);
        for (; word; word &= word - 1, j++) {
            if (j >= m) return -1;
            uint32_t slot = get_bits(&slots, b->slot_bits);
            int64_t idx = ((base + __builtin_ctz(word) - j) << b->low_bits) | (slot & low_mask);
            if (idx <= prev || idx >= b->n) return -1;
            prev = idx;
            if (emit) emit(ctx, (uint32_t)idx, slot >> b->low_bits);
        }
    }
    if (j != m) return -1;
    if (emit) return 0; /* validated before: the rest is known to be zero */
    for (; j < b->kc; j++)
        if (get_bits(&slots, b->slot_bits)) return -1;
    /* the bits after the bitmap, up to the block's end */
    if (bitmap.acc) return -1;
    for (const uint8_t *p = bitmap.p; p < block + b->size; p++)
        if (*p) return -1;
    return 0;
}

static void validate_chunk(void *arg, int64_t c, void *unused) {
    (void)unused;
    dec_ctx *d = (dec_ctx *)arg;
    const layout *l = d->l;
    const block_layout *b = block_of(l, c);
    const int L = l->n_levels;
    for (int j = 0; j < L; j++) {
        uint32_t u;
        memcpy(&u, d->payload + l->levels_off + 4 * ((int64_t)L * c + j), 4);
        if (!level_ok(u)) goto bad;
    }
    uint16_t m;
    memcpy(&m, d->payload + l->counts_off + 2 * c, 2);
    if (m > b->kc || walk_block(d->payload + block_offset(l, c), b, m, NULL, NULL)) goto bad;
    return;
bad:
    note_bad_chunk(&d->first_bad, c);
}

typedef struct {
    float *out;
    const float *v; /* v[code]: code = sign | q << 1 */
} scatter_ctx;

static void put_entry(void *arg, uint32_t idx, uint32_t code) {
    scatter_ctx *s = (scatter_ctx *)arg;
    s->out[idx] = s->v[code];
}

static void add_entry(void *arg, uint32_t idx, uint32_t code) {
    scatter_ctx *s = (scatter_ctx *)arg;
    s->out[idx] = s->out[idx] + s->v[code];
}

static void scatter_chunk(void *arg, int64_t c, void *unused) {
    (void)unused;
    dec_ctx *d = (dec_ctx *)arg;
    const layout *l = d->l;
    const block_layout *b = block_of(l, c);
    const int L = l->n_levels;
    float *out = d->out + c * l->chunk;
    float v[2 * MAX_LEVELS];
    for (int j = 0; j < L; j++) {
        float lv;
        memcpy(&lv, d->payload + l->levels_off + 4 * ((int64_t)L * c + j), 4);
        if (d->accumulate) lv = d->weight * lv; /* one fp32 product, as the reference */
        v[2 * j] = lv;
        v[2 * j + 1] = -lv;
    }
    if (!d->accumulate) memset(out, 0, (size_t)b->n * sizeof(float));
    uint16_t m;
    memcpy(&m, d->payload + l->counts_off + 2 * c, 2);
    scatter_ctx s = {out, v};
    walk_block(d->payload + block_offset(l, c), b, m, d->accumulate ? add_entry : put_entry, &s);
}

/* Decodes (accumulate = 0: out = decoded) or accumulates (out += weight * decoded) a payload of
 * exactly `payload_len` bytes into `out` of `out_len` values. Every chunk is validated before the
 * first write: returns -1 on success, the first invalid chunk (out untouched), ERR_ARGS or ERR_MEMORY. */
int64_t p2ps_decode(const uint8_t *payload, int64_t payload_len, int64_t n, int64_t chunk, int64_t k, int bits,
                    float *out, int64_t out_len, float weight, int accumulate, int n_threads) {
    layout l;
    if (make_layout(n, chunk, k, bits, &l) || payload_len != l.size || out_len != n || !payload || (n > 0 && !out))
        return ERR_ARGS;
    if (n == 0) return -1;
    dec_ctx d = {&l, payload, out, weight, accumulate != 0, -1};
    if (run_chunks(validate_chunk, &d, l.n_chunks, 0, n_threads, n)) return ERR_MEMORY;
    if (d.first_bad >= 0) return d.first_bad;
    if (run_chunks(scatter_chunk, &d, l.n_chunks, 0, n_threads, n)) return ERR_MEMORY;
    return -1;
}
