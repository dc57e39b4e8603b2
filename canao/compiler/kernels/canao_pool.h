/* The one thread pool of every canao runtime (the encoder's phases, the decoder's matrix products):
 * persistent workers that take items of a task from a shared counter, spin briefly and then sleep on
 * a futex, so an idle pool never competes for the cores.
 *
 *     pool_parallel(p, fn, ctx, items)   runs fn(ctx, tid, item) for item in 0..items-1 on every
 *                                        thread (the caller is thread 0) and returns when all are done
 *
 * Each claim is a compare-and-swap on (generation, next item), so a worker that was descheduled
 * across a task change fails its claim instead of running an item of the next task with the old
 * task's arguments; and the caller joins on finished items, not on every worker showing up: on a
 * shared core a worker may not run for milliseconds, and the caller and the others then take its
 * items instead of waiting at a barrier for it.
 *
 * Static functions in a header: both runtimes include it (the encoder's canao_runtime.c, the
 * decoder's canao_decoder.c), so an artifact carries one copy. */
#ifndef CANAO_POOL_H
#define CANAO_POOL_H
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CANAO_MAX_THREADS 64

/* the pause hint while spinning: fewer wasted cycles, and the sibling hyperthread / core gets them */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield" ::: "memory");
#endif
}

typedef void (*canao_task)(void *ctx, int tid, long item);

typedef struct canao_pool {
    int threads;
    long spin;                  /* pause iterations before sleeping (or, joining, before yielding) */
    pthread_t workers[CANAO_MAX_THREADS];
    atomic_uint gen;            /* bumped to start a task (or to stop) */
    atomic_int sleepers;
    atomic_int stop;
    atomic_ulong claim;         /* generation << 32 | next item: a stale worker can never claim */
    atomic_long completed;      /* items finished in this generation */
    _Atomic long items;
    _Atomic(canao_task) fn;
    void *ctx;                  /* read only after a successful claim, which orders it */
    int timed;                  /* accumulate join_ns (CANAO_PROFILE) */
    atomic_long join_ns;        /* the caller's thread-CPU time spent waiting for the others' items */
} canao_pool;

static void pool_futex_wait(atomic_uint *a, unsigned v) {
    syscall(SYS_futex, (unsigned *)a, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
}
static void pool_futex_wake(atomic_uint *a) { syscall(SYS_futex, (unsigned *)a, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0); }

static long pool_thread_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Claim and run items of generation `gen` until none are left. */
static void pool_drain(canao_pool *p, int tid, unsigned gen) {
    const canao_task fn = atomic_load_explicit(&p->fn, memory_order_relaxed);
    const long items = atomic_load_explicit(&p->items, memory_order_relaxed);
    unsigned long w = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        if ((unsigned)(w >> 32) != gen || (long)(w & 0xffffffffUL) >= items) return;
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &w, w + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        fn(p->ctx, tid, (long)(w & 0xffffffffUL));
        atomic_fetch_add_explicit(&p->completed, 1, memory_order_release);
        w = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
}

static void *pool_worker_main(void *arg) {
    canao_pool *p = ((void **)arg)[0];
    const int tid = (int)(long)((void **)arg)[1];
    free(arg);
    unsigned seen = 0;
    for (;;) {
        long i = 0;
        while (atomic_load_explicit(&p->gen, memory_order_acquire) == seen && i++ < p->spin) cpu_relax();
        if (atomic_load(&p->gen) == seen) {
            atomic_fetch_add(&p->sleepers, 1);
            while (atomic_load(&p->gen) == seen) pool_futex_wait(&p->gen, seen);
            atomic_fetch_sub(&p->sleepers, 1);
        }
        seen = atomic_load(&p->gen);
        if (atomic_load(&p->stop)) return NULL;
        pool_drain(p, tid, seen);
    }
}

static void pool_parallel(canao_pool *p, canao_task fn, void *ctx, long items) {
    if (p->threads == 1 || items <= 1) {
        for (long i = 0; i < items; i++) fn(ctx, 0, i);
        return;
    }
    const unsigned gen = atomic_load(&p->gen) + 1;
    p->ctx = ctx;
    atomic_store_explicit(&p->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&p->items, items, memory_order_relaxed);
    atomic_store(&p->completed, 0);
    atomic_store(&p->claim, (unsigned long)gen << 32);
    atomic_store(&p->gen, gen);  /* seq_cst: ordered before the sleepers load below */
    if (atomic_load(&p->sleepers) > 0) pool_futex_wake(&p->gen);
    pool_drain(p, 0, gen);
    /* join on finished items: spin briefly, then yield to a worker finishing its last item */
    const long t0 = p->timed ? pool_thread_ns() : 0;
    for (long i = 0; atomic_load_explicit(&p->completed, memory_order_acquire) != items; i++) {
        if (i < p->spin) cpu_relax();
        else sched_yield();
    }
    if (p->timed) atomic_fetch_add_explicit(&p->join_ns, pool_thread_ns() - t0, memory_order_relaxed);
}

static void pool_destroy(canao_pool *p) {
    if (!p) return;
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, 1);
    pool_futex_wake(&p->gen);
    for (int i = 1; i < p->threads; i++) pthread_join(p->workers[i], NULL);
    free(p);
}

/* threads: clamped to 1..CANAO_MAX_THREADS; NULL when memory or a thread could not be had */
static canao_pool *pool_create(int threads, long spin) {
    if (threads < 1) threads = 1;
    if (threads > CANAO_MAX_THREADS) threads = CANAO_MAX_THREADS;
    canao_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->threads = threads;
    p->spin = spin;
    for (int i = 1; i < threads; i++) {
        void **a = malloc(2 * sizeof(void *));
        if (!a) {
            p->threads = i;
            pool_destroy(p);
            return NULL;
        }
        a[0] = p;
        a[1] = (void *)(long)i;
        if (pthread_create(&p->workers[i], NULL, pool_worker_main, a) != 0) {
            free(a);
            p->threads = i;
            pool_destroy(p);
            return NULL;
        }
    }
    return p;
}
#endif
