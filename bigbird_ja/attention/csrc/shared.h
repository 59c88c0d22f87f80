/* What the CPU kernels (relative_terms.c, dropout.c) share: bfloat16 storage and their threads.

   bfloat16 is stored as uint16_t and computed in float: loads widen exactly; stores round to nearest even, as
   c10::BFloat16 does (NaN stays a quiet NaN).

   Their threads: run_shares (threads.c) splits [0, items) into contiguous shares and runs them in parallel. */

#ifndef BIGBIRD_JA_SHARED_H
#define BIGBIRD_JA_SHARED_H

#include <stdint.h>
#include <stdlib.h>

static inline float bf16_load(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline uint16_t bf16_store(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

/* The kernels' entry points (the work run_shares runs) are built twice, for AVX2 and for baseline x86-64, and the
   loader picks the one the CPU runs (function multi-versioning, GCC and Clang on ELF): the hash's 32-bit multiplies
   and the bf16 conversions vectorise 8 wide instead of being emulated on SSE2. `flatten` inlines every helper into
   each copy, so that the whole kernel is built for its target. Elementwise float arithmetic only (no reassociation,
   no contraction: no FMA is enabled), so both copies give the same bits (tests/test_cpu_kernels.py builds the
   baseline alone, -DKERNEL_ENTRY=, and compares). Elsewhere: one baseline build. */
#ifndef KERNEL_ENTRY
#if defined(__x86_64__) && defined(__ELF__) && defined(__has_attribute)
#if __has_attribute(target_clones) && __has_attribute(flatten)
#define KERNEL_ENTRY __attribute__((target_clones("avx2", "default"), flatten))
#endif
#endif
#endif
#ifndef KERNEL_ENTRY
#define KERNEL_ENTRY
#endif

/* work(context, first, last, share): items [first, last) of the call, share = 0 .. threads - 1 (for per-thread
   scratch) */
typedef void (*ShareWork)(const void *context, int64_t first, int64_t last, int share);

/* how many shares run_shares makes of `items` on at most `threads` threads (callers size per-share scratch by it) */
static inline int share_count(int64_t items, int threads) {
    if (threads > items) threads = (int)items;
    return threads < 1 ? 1 : threads;
}

/* threads.c: runs `work` on share_count(items, threads) contiguous shares of [0, items): on torch's own OpenMP team
   where bbja_use_openmp has handed its entry points over, else on pthreads of its own. Returns -1 if memory for the
   thread list runs out, 0 otherwise. */
#if defined(__GNUC__)
__attribute__((visibility("hidden")))
#endif
int run_shares(ShareWork work, const void *context, int64_t items, int threads);

#endif
