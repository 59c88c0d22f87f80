/* The CPU kernels' threads (shared.h's run_shares).

   Where torch's intra-op pool is OpenMP (Linux wheels: the libgomp torch ships), cpu_kernels.py hands this library
   that runtime's entry points (bbja_use_openmp) and each call's shares run on torch's own OpenMP team, as
   at::parallel_for's do. Threads of our own would share the cores with that team's workers, which spin for a while
   after every torch op before they sleep: a kernel call right after a matmul took 2.4x its time on an idle machine
   (2 cores, benchmarks/bench_kernel_threads.py). Nothing links an OpenMP runtime at build time: the pointers come
   from the one torch has loaded, so no second runtime and no dependence on its file name.

   Elsewhere (no OpenMP in torch, or bbja_use_openmp(0, 0, 0)) plain pthreads: the calling thread takes the first
   share, a share whose thread cannot start runs on the caller. Either way the shares, and so the results, are the
   same for a given number of threads. */

#include <pthread.h>
#include <stdlib.h>

#include "shared.h"

typedef void (*OpenMPParallel)(void (*body)(void *), void *data, unsigned num_threads, unsigned flags);
typedef int (*OpenMPQuery)(void);

/* set once, at load, before any kernel runs (cpu_kernels.py) */
static OpenMPParallel openmp_parallel;
static OpenMPQuery openmp_thread_num, openmp_num_threads;

/* GOMP_parallel, omp_get_thread_num and omp_get_num_threads of the runtime torch runs on; all three NULL: pthreads.
   Returns 1 if the OpenMP team is used from now on, 0 if pthreads are. */
int bbja_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    const int all = parallel && thread_num && num_threads;
    openmp_parallel = all ? (OpenMPParallel)parallel : 0;
    openmp_thread_num = all ? (OpenMPQuery)thread_num : 0;
    openmp_num_threads = all ? (OpenMPQuery)num_threads : 0;
    return all;
}

int bbja_uses_openmp(void) { return openmp_parallel != 0; }

typedef struct {
    ShareWork work;
    const void *context;
    int64_t items;
    int shares;
} Team;

/* one member of the team: shares member, member + size, ... (a team smaller than asked for, e.g. a call made inside
   another parallel region, still runs every share) */
static void team_member(void *data) {
    const Team *team = (const Team *)data;
    const int size = openmp_num_threads();
    for (int s = openmp_thread_num(); s < team->shares; s += size)
        team->work(team->context, team->items * s / team->shares, team->items * (s + 1) / team->shares, s);
}

typedef struct {
    ShareWork work;
    const void *context;
    int64_t first, last;
    int share;
} Share;

static void *run_share(void *share) {
    const Share *s = (const Share *)share;
    s->work(s->context, s->first, s->last, s->share);
    return 0;
}

int run_shares(ShareWork work, const void *context, int64_t items, int threads) {
    threads = share_count(items, threads);
    if (threads == 1) {
        work(context, 0, items, 0);
        return 0;
    }
    if (openmp_parallel) {
        Team team = {work, context, items, threads};
        openmp_parallel(team_member, &team, (unsigned)threads, 0);
        return 0;
    }
    Share *shares = (Share *)malloc(sizeof(Share) * threads);
    pthread_t *ids = (pthread_t *)malloc(sizeof(pthread_t) * threads);
    if (!shares || !ids) {
        free(shares);
        free(ids);
        return -1;
    }
    for (int t = 0; t < threads; t++) {
        shares[t].work = work;
        shares[t].context = context;
        shares[t].first = items * t / threads;
        shares[t].last = items * (t + 1) / threads;
        shares[t].share = t;
    }
    int started = 1;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&ids[t], 0, run_share, &shares[t]) != 0) break;
        started++;
    }
    for (int t = started; t < threads; t++) run_share(&shares[t]); /* shares whose thread could not start */
    run_share(&shares[0]);
    for (int t = 1; t < started; t++) pthread_join(ids[t], 0);
    free(shares);
    free(ids);
    return 0;
}
