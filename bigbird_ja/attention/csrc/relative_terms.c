/* DeBERTa's relative terms of block-sparse scores on CPU, read and scattered in one pass.

   For plane p (batch row and head, p = b * H + h), query block n of the nq listed ones (block q_block0 + n) and
   slot s of its K key blocks (block kb = kblocks[h * kb_sh + n * kb_sn + s]), query a and key c of the tile are
   tokens i = (q_block0 + n) * bs + a and j = kb * bs + c, and

       terms[p, n, a, s * bs + c] = qp[p, i, R - 1 - delta] + kp[p, (kb + hw) * bs + c, delta]
       delta = table[i - j + Np - 1]

   qp [P, Np, R] holds q . pos_key with its columns reversed, kp [P, T, R] holds k . pos_query with hw halo blocks
   before the keys (see blocked.py's _Relative). Either may be NULL (that term is absent). The backward adds the
   terms' gradient where each term was read (into each plane's gradients zeroed first, when asked: the plane's
   thread faults in and zeroes them just before it adds, instead of a separate pass); it runs one plane per thread, as different query blocks read the same
   key rows of kp. Plain C, no torch headers, no OpenMP runtime linked: `pip install` builds it (setup.py) wherever
   a C compiler is, and cpu_kernels.py loads it with ctypes and registers it as a torch op. The caller passes the
   number of threads (torch.get_num_threads()); the shares run on torch's own OpenMP team where there is one, else on
   pthreads (threads.c). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "shared.h"

typedef struct {
    const void *qp, *kp, *grad;
    void *out, *gqp, *gkp;
    const int64_t *table, *kblocks;
    int64_t P, H, nq, q_block0, K, bs, R, Np, T, hw, kb_sh, kb_sn;
    int zero;             /* backward: zero each plane's gradients before adding into them (else add to what is there) */
    char *scratch;        /* every thread's: share t's CHUNK * bs * bs elements start at t * scratch_bytes */
    size_t scratch_bytes;
} Job;

/* Tiles come in three kinds, by the deltas of their distances d in [d0 - (bs - 1), d0 + (bs - 1)] (d0 = (qb - kb) *
   bs), checked step by step (DeBERTa's buckets are exact near 0, logarithmic beyond, clamped at the ends):
     SHIFT     delta = d + const on the whole tile (the window, near blocks): rows of qp and of kp read contiguously;
     CONSTANT  one delta for the whole tile (far blocks, where the buckets saturate): one value per query and key;
     GENERAL   anything else: delta looked up per element.
   kp's part of a tile is read key by key (row c of kp, along a: consecutive deltas) and written transposed into a
   scratch tile, which the query rows then read in order: reading kp query by query would step R elements per key,
   a power-of-two stride that maps every row to the same few cache sets. */
enum { SHIFT, CONSTANT, GENERAL };

#define CHUNK 8 /* slots whose kp parts are kept at once: CHUNK * bs * bs elements of scratch per thread */

static int tile_kind(const int64_t *deltas, int64_t bs) { /* deltas: the table at d0 (index by a - c) */
    int shift = 1, constant = 1;
    for (int64_t t = -(bs - 1); t < bs - 1; t++) {
        const int64_t step = deltas[t + 1] - deltas[t];
        shift &= step == 1;
        constant &= step == 0;
    }
    return shift ? SHIFT : constant ? CONSTANT : GENERAL;
}

/* bfloat16 storage, float arithmetic (shared.h): the forward's sums round once, like PyTorch's bf16 add; the
   backward sums in float and rounds at each store into the bf16 gradients. */

#define DEFINE_KERNELS(TYPE, ACC, LD, ST, SUFFIX)                                                               \
    /* kp's part of one tile into the scratch: [bs(a), bs(c)] (SHIFT, GENERAL) or [bs(c)] (CONSTANT) */         \
    static void kp_part_##SUFFIX(const TYPE *kp_rows, ACC *scratch, const int64_t *deltas, int kind, int64_t bs, \
                                 int64_t R) {                                                                   \
        if (kind == CONSTANT) {                                                                                 \
            for (int64_t c = 0; c < bs; c++) scratch[c] = LD(kp_rows[c * R + deltas[0]]);                       \
            return;                                                                                             \
        }                                                                                                       \
        for (int64_t c = 0; c < bs; c++) {                                                                      \
            const TYPE *krow = kp_rows + c * R;                                                                 \
            ACC *dst = scratch + c;                                                                             \
            const int64_t *d = deltas - c;                                                                      \
            if (kind == SHIFT) {                                                                                \
                const TYPE *k0 = krow + d[0];                                                                   \
                for (int64_t a = 0; a < bs; a++) dst[a * bs] = LD(k0[a]);                                       \
            } else {                                                                                            \
                for (int64_t a = 0; a < bs; a++) dst[a * bs] = LD(krow[d[a]]);                                  \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    /* query row a of one tile: row[c] = qp's term (qrow: qp row a, NULL if absent) + kp's (scratch, if any) */ \
    static void tile_row_##SUFFIX(TYPE *row, const TYPE *qrow, const ACC *scratch, const int64_t *deltas,       \
                                  int kind, int64_t a, int64_t bs, int64_t R) {                                 \
        if (kind == CONSTANT) {                                                                                 \
            const ACC q = qrow ? LD(qrow[R - 1 - deltas[0]]) : 0;                                               \
            if (scratch)                                                                                        \
                for (int64_t c = 0; c < bs; c++) row[c] = ST(q + scratch[c]);                                   \
            else                                                                                                \
                for (int64_t c = 0; c < bs; c++) row[c] = ST(q);                                                \
            return;                                                                                             \
        }                                                                                                       \
        const ACC *src = scratch ? scratch + a * bs : 0;                                                        \
        if (!qrow) {                                                                                            \
            for (int64_t c = 0; c < bs; c++) row[c] = ST(src[c]);                                               \
            return;                                                                                             \
        }                                                                                                       \
        const TYPE *q_last = qrow + R - 1;                                                                      \
        if (kind == SHIFT) { /* column R - 1 - delta(a - c) rises with c */                                     \
            const TYPE *q0 = q_last - deltas[a];                                                                \
            if (src)                                                                                            \
                for (int64_t c = 0; c < bs; c++) row[c] = ST(LD(q0[c]) + src[c]);                               \
            else                                                                                                \
                for (int64_t c = 0; c < bs; c++) row[c] = q0[c];                                                \
        } else {                                                                                                \
            const int64_t *d = deltas + a;                                                                      \
            if (src)                                                                                            \
                for (int64_t c = 0; c < bs; c++) row[c] = ST(LD(q_last[-d[-c]]) + src[c]);                      \
            else                                                                                                \
                for (int64_t c = 0; c < bs; c++) row[c] = q_last[-d[-c]];                                       \
        }                                                                                                       \
    }                                                                                                           \
    /* one query block against its slots, CHUNK slots at a time: their kp parts first, then row by row (each qp \
       row read once per chunk, the output written in order) */                                                 \
    static void forward_items_##SUFFIX(const Job *j, ACC *scratch, int64_t first, int64_t last) {               \
        const TYPE *qp = (const TYPE *)j->qp, *kp = (const TYPE *)j->kp;                                        \
        TYPE *out = (TYPE *)j->out;                                                                             \
        const int64_t bs = j->bs, R = j->R, K = j->K, width = K * bs;                                           \
        const int64_t *deltas[CHUNK];                                                                           \
        int kinds[CHUNK];                                                                                       \
        for (int64_t item = first; item < last; item++) { /* item = p * nq + n */                               \
            const int64_t p = item / j->nq, n = item % j->nq, h = p % j->H, qb = j->q_block0 + n;               \
            const TYPE *qp_rows = qp ? qp + (p * j->Np + qb * bs) * R : 0;                                      \
            TYPE *item_rows = out + item * bs * width;                                                          \
            for (int64_t s0 = 0; s0 < K; s0 += CHUNK) {                                                         \
                const int64_t slots = K - s0 < CHUNK ? K - s0 : CHUNK;                                          \
                for (int64_t s = 0; s < slots; s++) {                                                           \
                    const int64_t kb = j->kblocks[h * j->kb_sh + n * j->kb_sn + s0 + s];                        \
                    deltas[s] = j->table + (qb - kb) * bs + j->Np - 1;                                          \
                    kinds[s] = tile_kind(deltas[s], bs);                                                        \
                    if (kp)                                                                                     \
                        kp_part_##SUFFIX(kp + (p * j->T + (kb + j->hw) * bs) * R, scratch + s * bs * bs,        \
                                         deltas[s], kinds[s], bs, R);                                           \
                }                                                                                               \
                for (int64_t a = 0; a < bs; a++)                                                                \
                    for (int64_t s = 0; s < slots; s++)                                                         \
                        tile_row_##SUFFIX(item_rows + a * width + (s0 + s) * bs, qp_rows ? qp_rows + a * R : 0, \
                                          kp ? scratch + s * bs * bs : 0, deltas[s], kinds[s], a, bs, R);       \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    /* dst[sign * d[step * t]] += src[t] for t < n, summing runs of equal deltas before one store each: adding  \
       element by element into the same place makes each add wait for the previous one's store */               \
    static void add_runs_##SUFFIX(TYPE *dst, const ACC *src, const int64_t *d, int64_t sign, int64_t step,      \
                                  int64_t n) {                                                                  \
        int64_t at = d[0];                                                                                      \
        ACC sum = src[0];                                                                                       \
        for (int64_t t = 1; t < n; t++) {                                                                       \
            const int64_t next = d[step * t];                                                                   \
            if (next != at) {                                                                                   \
                dst[sign * at] = ST(LD(dst[sign * at]) + sum);                                                  \
                at = next;                                                                                      \
                sum = 0;                                                                                        \
            }                                                                                                   \
            sum += src[t];                                                                                      \
        }                                                                                                       \
        dst[sign * at] = ST(LD(dst[sign * at]) + sum);                                                          \
    }                                                                                                           \
    static void backward_tile_##SUFFIX(const TYPE *tile, TYPE *gq_rows, TYPE *gk_rows, ACC *scratch,            \
                                       const int64_t *deltas, int64_t bs, int64_t R, int64_t width) {           \
        const int kind = tile_kind(deltas, bs);                                                                 \
        if (kind == CONSTANT) { /* row sums into qp's gradient, column sums into kp's */                        \
            const int64_t delta = deltas[0];                                                                    \
            for (int64_t c = 0; c < bs; c++) scratch[c] = 0;                                                    \
            for (int64_t a = 0; a < bs; a++) {                                                                  \
                const TYPE *row = tile + a * width;                                                             \
                ACC sum = 0;                                                                                    \
                for (int64_t c = 0; c < bs; c++) {                                                              \
                    sum += LD(row[c]);                                                                          \
                    scratch[c] += LD(row[c]);                                                                   \
                }                                                                                               \
                if (gq_rows) { /* one delta: the row's sum */                                                   \
                    TYPE *g = gq_rows + a * R + R - 1 - delta;                                                  \
                    *g = ST(LD(*g) + sum);                                                                      \
                }                                                                                               \
            }                                                                                                   \
            if (gk_rows)                                                                                        \
                for (int64_t c = 0; c < bs; c++) {                                                              \
                    TYPE *g = gk_rows + c * R + delta;                                                          \
                    *g = ST(LD(*g) + scratch[c]);                                                               \
                }                                                                                               \
            return;                                                                                             \
        }                                                                                                       \
        for (int64_t a = 0; a < bs; a++) {                                                                      \
            const TYPE *row = tile + a * width;                                                                 \
            if (gk_rows) /* transposed into the scratch, added key by key below */                              \
                for (int64_t c = 0; c < bs; c++) scratch[c * bs + a] = LD(row[c]);                              \
            if (!gq_rows) continue;                                                                             \
            TYPE *gqrow = gq_rows + a * R + R - 1;                                                              \
            if (kind == SHIFT) {                                                                                \
                TYPE *g0 = gqrow - deltas[a];                                                                   \
                for (int64_t c = 0; c < bs; c++) g0[c] = ST(LD(g0[c]) + LD(row[c]));                            \
            } else {                                                                                            \
                ACC *values = scratch + bs * bs; /* the row in ACC (scratch: CHUNK >= 2 tiles) */               \
                for (int64_t c = 0; c < bs; c++) values[c] = LD(row[c]);                                        \
                add_runs_##SUFFIX(gqrow, values, deltas + a, -1, -1, bs); /* gqrow[-d[-c]] += row[c] */         \
            }                                                                                                   \
        }                                                                                                       \
        if (!gk_rows) return;                                                                                   \
        for (int64_t c = 0; c < bs; c++) {                                                                      \
            TYPE *gkrow = gk_rows + c * R;                                                                      \
            const ACC *src = scratch + c * bs;                                                                  \
            if (kind == SHIFT) {                                                                                \
                TYPE *g0 = gkrow + deltas[-c];                                                                  \
                for (int64_t a = 0; a < bs; a++) g0[a] = ST(LD(g0[a]) + src[a]);                                \
            } else {                                                                                            \
                add_runs_##SUFFIX(gkrow, src, deltas - c, 1, 1, bs); /* gkrow[d[a]] += src[a] */                \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    static void backward_planes_##SUFFIX(const Job *j, ACC *scratch, int64_t first, int64_t last) {             \
        const TYPE *grad = (const TYPE *)j->grad;                                                               \
        TYPE *gqp = (TYPE *)j->gqp, *gkp = (TYPE *)j->gkp;                                                      \
        const int64_t bs = j->bs, R = j->R, K = j->K, width = K * bs;                                           \
        for (int64_t p = first; p < last; p++) {                                                                \
            const int64_t h = p % j->H;                                                                         \
            if (j->zero) { /* the plane's gradients written here first: faulted in and zeroed on this thread */ \
                if (gqp) memset(gqp + p * j->Np * R, 0, sizeof(TYPE) * j->Np * R);                              \
                if (gkp) memset(gkp + p * j->T * R, 0, sizeof(TYPE) * j->T * R);                                \
            }                                                                                                   \
            for (int64_t n = 0; n < j->nq; n++) {                                                               \
                const int64_t qb = j->q_block0 + n;                                                             \
                TYPE *gq_rows = gqp ? gqp + (p * j->Np + qb * bs) * R : 0;                                      \
                for (int64_t s = 0; s < K; s++) {                                                               \
                    const int64_t kb = j->kblocks[h * j->kb_sh + n * j->kb_sn + s];                             \
                    TYPE *gk_rows = gkp ? gkp + (p * j->T + (kb + j->hw) * bs) * R : 0;                         \
                    backward_tile_##SUFFIX(grad + (p * j->nq + n) * bs * width + s * bs, gq_rows, gk_rows,      \
                                           scratch, j->table + (qb - kb) * bs + j->Np - 1, bs, R, width);       \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    KERNEL_ENTRY static void forward_task_##SUFFIX(const void *job, int64_t first, int64_t last, int share) {   \
        const Job *j = (const Job *)job;                                                                        \
        forward_items_##SUFFIX(j, (ACC *)(j->scratch + share * j->scratch_bytes), first, last);                 \
    }                                                                                                           \
    KERNEL_ENTRY static void backward_task_##SUFFIX(const void *job, int64_t first, int64_t last, int share) {  \
        const Job *j = (const Job *)job;                                                                        \
        backward_planes_##SUFFIX(j, (ACC *)(j->scratch + share * j->scratch_bytes), first, last);               \
    }

#define PLAIN(x) (x)
DEFINE_KERNELS(float, float, PLAIN, PLAIN, f32)
DEFINE_KERNELS(double, double, PLAIN, PLAIN, f64)
DEFINE_KERNELS(uint16_t, float, bf16_load, bf16_store, bf16)

/* The work items' shares on `threads` threads (shared.h), each with its own scratch. */
static int run_parallel(ShareWork work, Job *job, int64_t items, int threads, size_t element_size) {
    threads = share_count(items, threads);
    job->scratch_bytes = element_size * CHUNK * job->bs * job->bs;
    job->scratch = (char *)malloc(job->scratch_bytes * threads);
    if (!job->scratch) return -1;
    const int status = run_shares(work, job, items, threads);
    free(job->scratch);
    return status;
}

#define DEFINE_ENTRY_POINTS(ACC, SUFFIX)                                                                        \
    int bbja_terms_forward_##SUFFIX(const void *qp, const void *kp, void *out, const int64_t *table,            \
                                    const int64_t *kblocks, int64_t P, int64_t H, int64_t nq, int64_t q_block0, \
                                    int64_t K, int64_t bs, int64_t R, int64_t Np, int64_t T, int64_t hw,        \
                                    int64_t kb_sh, int64_t kb_sn, int threads) {                                \
        Job job = {qp, kp, 0, out, 0, 0, table, kblocks, P, H, nq, q_block0, K, bs, R, Np, T, hw, kb_sh, kb_sn, \
                   0, 0, 0};                                                                                    \
        return run_parallel(forward_task_##SUFFIX, &job, P * nq, threads, sizeof(ACC));                         \
    }                                                                                                           \
    int bbja_terms_backward_##SUFFIX(const void *grad, void *gqp, void *gkp, const int64_t *table,              \
                                     const int64_t *kblocks, int64_t P, int64_t H, int64_t nq, int64_t q_block0, \
                                     int64_t K, int64_t bs, int64_t R, int64_t Np, int64_t T, int64_t hw,       \
                                     int64_t kb_sh, int64_t kb_sn, int zero, int threads) {                     \
        Job job = {0, 0, grad, 0, gqp, gkp, table, kblocks, P, H, nq, q_block0, K, bs, R, Np, T, hw, kb_sh,     \
                   kb_sn, zero, 0, 0};                                                                          \
        return run_parallel(backward_task_##SUFFIX, &job, P, threads, sizeof(ACC));                             \
    }

DEFINE_ENTRY_POINTS(float, f32)
DEFINE_ENTRY_POINTS(double, f64)
DEFINE_ENTRY_POINTS(float, bf16)
