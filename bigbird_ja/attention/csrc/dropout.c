/* Attention dropout from a counter-based hash on CPU: out = in * keep * scale, with keep a pure function of (seed,
   plane, query token, key token). The hash is specified in bigbird_ja/attention/dropout.py (whose PyTorch version
   gives the same bits); here it is written once per row for the row's two keys and once per element for the rest.

   in [B, H, G, R, C] with any strides (elements), out contiguous; qpos [G, R] and kpos [Hk, G, C] int64, contiguous
   (Hk 1: one set of key positions for every head). Plain C, no torch headers, built into the same library as
   relative_terms.c and run on the same threads (threads.c); the caller passes the number of threads
   (torch.get_num_threads()). Also here: the backward of softmax and this dropout in one pass, in place
   (bbja_softmax_dropout_backward_*, for blocked_slots.SlotAttention). */

#include <stdint.h>
#include <stdlib.h>

#include "shared.h"

static inline uint32_t mix(uint32_t x) { /* "lowbias32" */
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static const uint32_t LANE_KEYS[2] = {0x243f6a88u, 0x85a308d3u};

/* One row's hash keys (dropout.py: a and the odd multiplier b) and its key positions, for the forward and the fused
   backward alike, so that the mask regenerated in the backward is the forward's. The plane's two states are mixed once
   per plane: rows run in order, and `cache` remembers the last plane. */
typedef struct {
    int64_t plane;
    uint32_t t[2];
} PlaneKeys;

static inline const int64_t *row_keys(PlaneKeys *cache, const uint32_t seed_state[2], const int64_t *qpos,
                                      const int64_t *kpos, int64_t p, int64_t h, int64_t g, int64_t r, int64_t G,
                                      int64_t R, int64_t C, int64_t Hk, uint32_t *a, uint32_t *key) {
    if (p != cache->plane) {
        cache->plane = p;
        for (int l = 0; l < 2; l++) cache->t[l] = mix(seed_state[l] ^ (uint32_t)p);
    }
    const uint32_t i = (uint32_t)qpos[g * R + r];
    *a = mix(cache->t[0] ^ i);
    *key = mix(cache->t[1] ^ i) | 1u;
    return kpos + ((Hk == 1 ? 0 : h) * G + g) * C;
}

typedef struct {
    const void *in;
    void *out;
    const int64_t *qpos, *kpos;
    int64_t B, H, G, R, C, Hk, sb, sh, sg, sr, sc;
    uint32_t seed_state[2], threshold;
    double scale;
} Job;

/* The multiplies by the keep factor (scale or 0) rather than a select keep NaN * 0 = NaN, like probs * keep * scale.
   The contiguous loop is its own function so that the compiler vectorises it without a stride in the way. */
#define DEFINE_KERNEL(TYPE, ACC, LD, ST, SUFFIX)                                                                \
    static void row_##SUFFIX(const TYPE *restrict in, TYPE *restrict out, const int64_t *restrict kpos,         \
                             int64_t C, uint32_t a, uint32_t b, uint32_t threshold, ACC scale) {                \
        for (int64_t c = 0; c < C; c++) {                                                                       \
            const uint32_t h = mix(a ^ ((uint32_t)kpos[c] * b));                                                \
            out[c] = ST(LD(in[c]) * (h >= threshold ? scale : (ACC)0));                                         \
        }                                                                                                       \
    }                                                                                                           \
    static void row_strided_##SUFFIX(const TYPE *in, int64_t sc, TYPE *restrict out,                            \
                                     const int64_t *restrict kpos, int64_t C, uint32_t a, uint32_t b,           \
                                     uint32_t threshold, ACC scale) {                                           \
        for (int64_t c = 0; c < C; c++) {                                                                       \
            const uint32_t h = mix(a ^ ((uint32_t)kpos[c] * b));                                                \
            out[c] = ST(LD(in[c * sc]) * (h >= threshold ? scale : (ACC)0));                                    \
        }                                                                                                       \
    }                                                                                                           \
    /* rows [first, last) of the call: row = ((b * H + h) * G + g) * R + r */                                   \
    KERNEL_ENTRY static void rows_##SUFFIX(const void *job, int64_t first, int64_t last, int share) {           \
        const Job *j = (const Job *)job;                                                                        \
        (void)share; /* no scratch */                                                                           \
        const TYPE *in = (const TYPE *)j->in;                                                                   \
        TYPE *out = (TYPE *)j->out;                                                                             \
        const ACC scale = (ACC)j->scale;                                                                        \
        PlaneKeys cache = {-1, {0, 0}};                                                                         \
        for (int64_t row = first; row < last; row++) {                                                          \
            const int64_t r = row % j->R, g = (row / j->R) % j->G, p = row / (j->R * j->G);                     \
            const int64_t b = p / j->H, h = p % j->H;                                                           \
            uint32_t a, key;                                                                                    \
            const int64_t *kpos = row_keys(&cache, j->seed_state, j->qpos, j->kpos, p, h, g, r, j->G, j->R,     \
                                           j->C, j->Hk, &a, &key);                                              \
            const TYPE *src = in + b * j->sb + h * j->sh + g * j->sg + r * j->sr;                               \
            if (j->sc == 1)                                                                                     \
                row_##SUFFIX(src, out + row * j->C, kpos, j->C, a, key, j->threshold, scale);                   \
            else                                                                                                \
                row_strided_##SUFFIX(src, j->sc, out + row * j->C, kpos, j->C, a, key, j->threshold, scale);    \
        }                                                                                                       \
    }

#define PLAIN(x) (x)
DEFINE_KERNEL(float, float, PLAIN, PLAIN, f32)
DEFINE_KERNEL(double, double, PLAIN, PLAIN, f64)
DEFINE_KERNEL(uint16_t, float, bf16_load, bf16_store, bf16)

/* The backward of softmax and then dropout, in place on the gradient of the dropped probabilities, row by row:
       g <- g * keep * scale            (dropout's backward: the forward's mask, regenerated; none: threshold 0, scale 1)
       g <- probs * (g - sum(g * probs)) (softmax's backward, probs its output)
   grad and probs [B, H, G, R, C] contiguous. The row's sum runs in eight lanes added in a fixed order (vectorised
   the same way in every build: the AVX2 and baseline copies give the same bits). float32 and float64. */
typedef struct {
    void *grad;
    const void *probs;
    const int64_t *qpos, *kpos;
    int64_t B, H, G, R, C, Hk;
    uint32_t seed_state[2], threshold;
    double scale;
    int dropout;
} BackwardJob;

#define LANES 8

#define DEFINE_SOFTMAX_BACKWARD(TYPE, SUFFIX)                                                                   \
    static void grad_row_##SUFFIX(TYPE *restrict g, const TYPE *restrict p, const int64_t *restrict kpos,       \
                                  int64_t C, uint32_t a, uint32_t b, uint32_t threshold, TYPE scale,            \
                                  int dropout) {                                                                \
        if (dropout)                                                                                            \
            for (int64_t c = 0; c < C; c++) g[c] *= mix(a ^ ((uint32_t)kpos[c] * b)) >= threshold ? scale : 0;  \
        TYPE lanes[LANES] = {0};                                                                                \
        int64_t c = 0;                                                                                          \
        for (; c + LANES <= C; c += LANES)                                                                      \
            for (int l = 0; l < LANES; l++) lanes[l] += g[c + l] * p[c + l];                                    \
        TYPE dot = 0;                                                                                           \
        for (int l = 0; l < LANES; l++) dot += lanes[l];                                                        \
        for (; c < C; c++) dot += g[c] * p[c];                                                                  \
        for (c = 0; c < C; c++) g[c] = p[c] * (g[c] - dot);                                                     \
    }                                                                                                           \
    KERNEL_ENTRY static void grad_rows_##SUFFIX(const void *job, int64_t first, int64_t last, int share) {      \
        const BackwardJob *j = (const BackwardJob *)job;                                                        \
        (void)share;                                                                                            \
        PlaneKeys cache = {-1, {0, 0}};                                                                         \
        for (int64_t row = first; row < last; row++) {                                                          \
            const int64_t r = row % j->R, g = (row / j->R) % j->G, p = row / (j->R * j->G);                     \
            const int64_t *kpos = 0; /* no dropout: positions neither given nor read */                         \
            uint32_t a = 0, key = 0;                                                                            \
            if (j->dropout)                                                                                     \
                kpos = row_keys(&cache, j->seed_state, j->qpos, j->kpos, p, p % j->H, g, r, j->G, j->R, j->C,   \
                                j->Hk, &a, &key);                                                               \
            grad_row_##SUFFIX((TYPE *)j->grad + row * j->C, (const TYPE *)j->probs + row * j->C, kpos, j->C, a, \
                              key, j->threshold, (TYPE)j->scale, j->dropout);                                   \
        }                                                                                                       \
    }

DEFINE_SOFTMAX_BACKWARD(float, f32)
DEFINE_SOFTMAX_BACKWARD(double, f64)

#define MIN_ELEMENTS_PER_THREAD 32768 /* below this a thread costs more than it saves */

/* `rows` rows of C elements in shares on at most `threads` threads (shared.h). */
static int run_rows(ShareWork work, const void *job, int64_t rows, int64_t C, int threads) {
    const int64_t most = rows * C / MIN_ELEMENTS_PER_THREAD;
    if (threads > most) threads = (int)most;
    return run_shares(work, job, rows, threads);
}

/* the two lanes' states of a seed (dropout.py: s_A, s_B) */
static void seed_states(uint64_t seed, uint32_t states[2]) {
    for (int l = 0; l < 2; l++) states[l] = mix(mix((uint32_t)seed ^ LANE_KEYS[l]) ^ (uint32_t)(seed >> 32));
}

#define DEFINE_ENTRY_POINT(SUFFIX)                                                                              \
    int bbja_dropout_##SUFFIX(const void *in, void *out, const int64_t *qpos, const int64_t *kpos, int64_t B,   \
                              int64_t H, int64_t G, int64_t R, int64_t C, int64_t Hk, int64_t sb, int64_t sh,   \
                              int64_t sg, int64_t sr, int64_t sc, uint64_t seed, uint32_t threshold,            \
                              double scale, int threads) {                                                      \
        Job job = {in, out, qpos, kpos, B, H, G, R, C, Hk, sb, sh, sg, sr, sc, {0, 0}, threshold, scale};       \
        seed_states(seed, job.seed_state);                                                                      \
        return run_rows(rows_##SUFFIX, &job, B * H * G * R, C, threads);                                        \
    }

DEFINE_ENTRY_POINT(f32)
DEFINE_ENTRY_POINT(f64)
DEFINE_ENTRY_POINT(bf16)

#define DEFINE_BACKWARD_ENTRY_POINT(SUFFIX)                                                                     \
    int bbja_softmax_dropout_backward_##SUFFIX(void *grad, const void *probs, const int64_t *qpos,              \
                                               const int64_t *kpos, int64_t B, int64_t H, int64_t G, int64_t R, \
                                               int64_t C, int64_t Hk, uint64_t seed, uint32_t threshold,        \
                                               double scale, int dropout, int threads) {                        \
        BackwardJob job = {grad, probs, qpos, kpos, B, H, G, R, C, Hk, {0, 0}, threshold, scale, dropout};     \
        seed_states(seed, job.seed_state);                                                                      \
        return run_rows(grad_rows_##SUFFIX, &job, B * H * G * R, C, threads);                                   \
    }

DEFINE_BACKWARD_ENTRY_POINT(f32)
DEFINE_BACKWARD_ENTRY_POINT(f64)
