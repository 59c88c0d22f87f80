/* Attention dropout from a counter-based hash on CPU: out = in * keep * scale, with keep a pure function of (seed,
   plane, query token, key token). The hash is specified in bigbird_ja/attention/dropout.py (whose PyTorch version
   gives the same bits); here it is written once per row for the row's two keys and once per element for the rest.

   in [B, H, G, R, C] with any strides (elements), out contiguous; qpos [G, R] and kpos [Hk, G, C] int64, contiguous
   (Hk 1: one set of key positions for every head). Plain C with pthreads, no torch headers and no OpenMP runtime,
   built into the same library as relative_terms.c; the caller passes the number of threads
   (torch.get_num_threads()). */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

static inline uint32_t mix(uint32_t x) { /* "lowbias32" */
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static const uint32_t LANE_KEYS[2] = {0x243f6a88u, 0x85a308d3u};

static inline float bf16_load(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline uint16_t bf16_store(float f) { /* round to nearest even, as c10::BFloat16 */
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

typedef struct {
    const void *in;
    void *out;
    const int64_t *qpos, *kpos;
    int64_t B, H, G, R, C, Hk, sb, sh, sg, sr, sc;
    uint32_t seed_state[2], threshold;
    double scale;
    int64_t first, last; /* this worker's rows (row = ((b * H + h) * G + g) * R + r) */
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
    static void rows_##SUFFIX(const Job *j) {                                                                   \
        const TYPE *in = (const TYPE *)j->in;                                                                   \
        TYPE *out = (TYPE *)j->out;                                                                             \
        const ACC scale = (ACC)j->scale;                                                                        \
        int64_t plane = -1;                                                                                     \
        uint32_t t[2] = {0, 0};                                                                                 \
        for (int64_t row = j->first; row < j->last; row++) {                                                    \
            const int64_t r = row % j->R, g = (row / j->R) % j->G, p = row / (j->R * j->G);                     \
            const int64_t b = p / j->H, h = p % j->H;                                                           \
            if (p != plane) { /* once per plane */                                                              \
                plane = p;                                                                                      \
                for (int l = 0; l < 2; l++) t[l] = mix(j->seed_state[l] ^ (uint32_t)p);                         \
            }                                                                                                   \
            const uint32_t i = (uint32_t)j->qpos[g * j->R + r];                                                 \
            const uint32_t a = mix(t[0] ^ i), key = mix(t[1] ^ i) | 1u;                                         \
            const int64_t *kpos = j->kpos + ((j->Hk == 1 ? 0 : h) * j->G + g) * j->C;                           \
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

typedef void (*Work)(const Job *);

typedef struct {
    Work work;
    Job job;
} Task;

static void *run_task(void *task) {
    Task *t = (Task *)task;
    t->work(&t->job);
    return 0;
}

#define MIN_ELEMENTS_PER_THREAD 32768 /* below this a thread costs more than it saves */

/* Splits the rows into `threads` contiguous shares; the calling thread takes the first. */
static int run_rows(Work work, const Job *job, int threads) {
    const int64_t rows = job->B * job->H * job->G * job->R;
    const int64_t most = rows * job->C / MIN_ELEMENTS_PER_THREAD;
    if (threads > most) threads = (int)most;
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    Task *tasks = (Task *)malloc(sizeof(Task) * threads);
    pthread_t *ids = (pthread_t *)malloc(sizeof(pthread_t) * threads);
    if (!tasks || !ids) {
        free(tasks);
        free(ids);
        return -1;
    }
    for (int t = 0; t < threads; t++) {
        tasks[t].work = work;
        tasks[t].job = *job;
        tasks[t].job.first = rows * t / threads;
        tasks[t].job.last = rows * (t + 1) / threads;
    }
    int started = 1;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&ids[t], 0, run_task, &tasks[t]) != 0) break;
        started++;
    }
    for (int t = started; t < threads; t++) run_task(&tasks[t]); /* shares whose thread could not start */
    run_task(&tasks[0]);
    for (int t = 1; t < started; t++) pthread_join(ids[t], 0);
    free(tasks);
    free(ids);
    return 0;
}

#define DEFINE_ENTRY_POINT(SUFFIX)                                                                              \
    int bbja_dropout_##SUFFIX(const void *in, void *out, const int64_t *qpos, const int64_t *kpos, int64_t B,   \
                              int64_t H, int64_t G, int64_t R, int64_t C, int64_t Hk, int64_t sb, int64_t sh,   \
                              int64_t sg, int64_t sr, int64_t sc, uint64_t seed, uint32_t threshold,            \
                              double scale, int threads) {                                                      \
        Job job = {in, out, qpos, kpos, B, H, G, R, C, Hk, sb, sh, sg, sr, sc, {0, 0}, threshold, scale, 0, 0}; \
        for (int l = 0; l < 2; l++)                                                                             \
            job.seed_state[l] = mix(mix((uint32_t)seed ^ LANE_KEYS[l]) ^ (uint32_t)(seed >> 32));               \
        return run_rows(rows_##SUFFIX, &job, threads);                                                          \
    }

DEFINE_ENTRY_POINT(f32)
DEFINE_ENTRY_POINT(f64)
DEFINE_ENTRY_POINT(bf16)
