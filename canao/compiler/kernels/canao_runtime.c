/* The fixed part of every artifact: weights mapping, arena, thread scratch, batching,
 * and the thread pool that runs the generated phases.
 *
 * Threading model. The generated model.c splits the forward pass into phases: the
 * kernels of a phase only read rows of their inputs that the same row block produced
 * (token-wise GEMMs, LayerNorms, epilogues), so one row block can run through all of
 * a phase's kernels without waiting for anyone. Only a kernel that reads a tensor
 * across rows (attention reads every key) starts a new phase, after every block of the
 * last one is done: one join per transformer layer instead of one per kernel.
 *
 * Within a phase, threads take row blocks from a shared counter (dynamic schedule,
 * canao_pool.h, the pool the decoder runtime uses too), and the phase ends when every
 * block is done, not when every thread has arrived: a thread the OS descheduled on a
 * shared core delays the others by at most one block. Workers persist between runs;
 * they spin briefly and then sleep on a futex, so an idle pool never competes for the
 * cores. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "canao.h"
#include "canao_pool.h"
#include "canao_weights.h"

#if defined(__aarch64__)
#include <sys/auxv.h>
#endif

extern const long canao_scratch_floats, canao_block_rows, canao_row_quantum;
extern const int canao_num_phases;
void canao_phase(int phase, const float *W, char *arena, float *scratch, long S, long r0, long r1,
                 const int64_t *input_ids, const int64_t *token_type_ids, const int64_t *attention_mask,
                 float *const *outputs);

extern const int canao_num_kernels;
extern const char *const canao_kernel_names[];

static long spin_iters = 2000;  /* ~10-40 us of pause before sleeping (CANAO_SPIN overrides) */

/* ---- CANAO_PROFILE=1: time of every kernel call, printed to stderr at close ------------ */

int canao_profiling;                   /* read by the generated KCALL */
static atomic_long *prof_ns;           /* per kernel, summed over threads and runs */
static atomic_long prof_join_ns, prof_runs;

/* the thread's CPU clock: on a shared core, time the OS gave to other processes does not count */
long canao_profile_begin(void) { return pool_thread_ns(); }
void canao_profile_end(int kernel, long t0) {
    atomic_fetch_add_explicit(&prof_ns[kernel], canao_profile_begin() - t0, memory_order_relaxed);
}

/* ms per run of each kernel, and the shares; kernels of one layer shape summed under their label's tail */
static void profile_report(void) {
    const long runs = atomic_load(&prof_runs);
    if (!prof_ns || runs == 0) return;
    double total = 0;
    for (int i = 0; i < canao_num_kernels; i++) total += atomic_load(&prof_ns[i]);
    total += atomic_load(&prof_join_ns);
    fprintf(stderr, "canao profile: %ld runs, %.3f ms of thread CPU time per run (all threads)\n", runs, total / runs / 1e6);
    /* kernels grouped by what follows the name (the shape): same-shaped layers add up */
    int done[4096] = {0};
    for (int i = 0; i < canao_num_kernels && i < 4096; i++) {
        if (done[i]) continue;
        const char *tail = strchr(canao_kernel_names[i], '_');
        tail = tail ? tail + 1 : canao_kernel_names[i];
        double ns = 0;
        int count = 0;
        for (int j = i; j < canao_num_kernels && j < 4096; j++) {
            const char *t2 = strchr(canao_kernel_names[j], '_');
            if (!done[j] && strcmp(t2 ? t2 + 1 : canao_kernel_names[j], tail) == 0) {
                done[j] = 1;
                ns += atomic_load(&prof_ns[j]);
                count++;
            }
        }
        fprintf(stderr, "  %8.3f ms %5.1f%%  %2dx %s\n", ns / runs / 1e6, 100 * ns / total, count, tail);
    }
    /* the calling thread's wait for the others' last blocks at the end of each phase */
    fprintf(stderr, "  %8.3f ms %5.1f%%      join waits\n", atomic_load(&prof_join_ns) / (double)runs / 1e6,
            100 * atomic_load(&prof_join_ns) / total);
}

/* ---- a run: each phase's row blocks through the pool ------------------------------- */

typedef struct {
    const float *W;
    char *arena;
    float *scratch;
    long S, rb, nblocks;
    const int64_t *ids, *tt, *mask;
    float *const *outputs;
    int phase;
} job_t;

struct canao_model {
    void *map;
    size_t map_bytes;
    char *arena;
    float *scratch;
    int threads;
    long block_rows;            /* the largest row block (canao_block_rows, CANAO_BLOCK_ROWS overrides) */
    long blocks_per_thread;     /* aim for at least this many blocks per thread (CANAO_BLOCKS_PER_THREAD) */
    canao_pool *pool;
};

static void phase_block(void *ctx, int tid, long b) {
    const job_t *j = ctx;
    const long r0 = b * j->rb, r1 = r0 + j->rb < j->S ? r0 + j->rb : j->S;
    canao_phase(j->phase, j->W, j->arena, j->scratch + (long)tid * canao_scratch_floats, j->S, r0, r1, j->ids, j->tt,
                j->mask, j->outputs);
}

/* ---- the C API ----------------------------------------------------------------------- */

static int cpu_ok(char *err, int n) {
#if defined(__aarch64__)
    /* NEON (asimd) and the dot-product instructions (asimddp, ARMv8.2-A) */
    const unsigned long hw = getauxval(AT_HWCAP);
    const int ok = (hw & (1UL << 1)) && (hw & (1UL << 20));
    if (!ok) snprintf(err, n, "this artifact was built for %s (NEON + dotprod), which this CPU does not support",
                      canao_target);
    return ok;
#else
    __builtin_cpu_init();
    int ok = strncmp(canao_target, "avx512", 6) == 0
                 ? __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
                 : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(canao_target, "avx512_vnni") == 0)
        ok = ok && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
    if (!ok) snprintf(err, n, "this artifact was built for %s, which this CPU does not support", canao_target);
    return ok;
#endif
}

int canao_set_threads(canao_model *m, int threads) {
    if (threads < 1) threads = 1;
    if (threads > CANAO_MAX_THREADS) threads = CANAO_MAX_THREADS;
    if (m->pool && m->threads == threads) return 0;
    pool_destroy(m->pool);
    m->pool = NULL;
    free(m->scratch);
    m->scratch = aligned_alloc(64, ((size_t)threads * canao_scratch_floats * sizeof(float) + 63) / 64 * 64);
    m->threads = threads;
    if (!m->scratch) return -1;
    m->pool = pool_create(threads, spin_iters);
    if (m->pool) m->pool->timed = canao_profiling;
    return m->pool ? 0 : -1;
}

static long env_long(const char *name, long fallback) {
    const char *v = getenv(name);
    return v && *v ? atol(v) : fallback;
}

canao_model *canao_open(const char *path, int threads, char *err, int n) {
    if (!cpu_ok(err, n)) return NULL;
    size_t map_bytes = 0;
    void *map = canao_map_weights(path, canao_weight_bytes, &map_bytes, err, n);
    if (!map) return NULL;
    spin_iters = env_long("CANAO_SPIN", spin_iters);
    if (env_long("CANAO_PROFILE", 0) && !prof_ns) {
        prof_ns = calloc(canao_num_kernels, sizeof *prof_ns);
        canao_profiling = prof_ns != NULL;
    }
    canao_model *m = calloc(1, sizeof *m);
    m->map = map;
    m->map_bytes = map_bytes;
    m->block_rows = env_long("CANAO_BLOCK_ROWS", canao_block_rows);
    m->blocks_per_thread = env_long("CANAO_BLOCKS_PER_THREAD", 1);
    m->arena = aligned_alloc(64, (canao_arena_bytes + 63) / 64 * 64 + 64);
    if (!m->arena || canao_set_threads(m, threads) != 0) {
        snprintf(err, n, "out of memory (or no threads)");
        canao_close(m);
        return NULL;
    }
    return m;
}

/* Rows per block: as few blocks as keep each under block_rows (every block re-reads the
 * weights), at least blocks_per_thread per thread, a whole number of blocks per thread.
 * One thread: rows a multiple of every GEMM tile's (canao_row_quantum). Several: the blocks
 * equal to within 4 rows, since rounding them to the quantum (12) would split 128 rows
 * 72 + 56 and make one thread wait for the other; a partial tile costs less. */
static long block_rows(const canao_model *m, long S) {
    const long max_rows = m->block_rows > 0 ? m->block_rows : S;
    long nb = (S + max_rows - 1) / max_rows;
    if (m->threads > 1) {
        const long per = m->blocks_per_thread > 0 ? m->blocks_per_thread : 1;
        if (nb < m->threads * per) nb = m->threads * per;
        nb = (nb + m->threads - 1) / m->threads * m->threads;
    }
    const long q = m->threads > 1 ? 4 : canao_row_quantum;
    long rb = (S + nb - 1) / nb;
    rb = (rb + q - 1) / q * q;
    return rb < 1 ? 1 : rb;
}

int canao_run(canao_model *m, int batch, int seq, const int64_t *ids, const int64_t *tt, const int64_t *mask,
              float *const *outputs, char *err, int n) {
    if (seq < 1 || seq > canao_max_seq) {
        snprintf(err, n, "sequence length %d is outside 1..%ld (compile with a larger --max-seq)", seq, canao_max_seq);
        return -1;
    }
    if (batch < 1) { snprintf(err, n, "batch size %d must be at least 1", batch); return -1; }
    /* the ids index the embedding tables: one outside them would read outside the weights */
    for (long i = 0; i < (long)batch * seq; i++) {
        if (canao_vocab_size > 0 && (ids[i] < 0 || ids[i] >= canao_vocab_size)) {
            snprintf(err, n, "token id %lld (row %ld, position %ld) is outside this artifact's vocabulary 0..%ld: "
                     "the tokenizer does not match the model", (long long)ids[i], i / seq, i % seq, canao_vocab_size - 1);
            return -1;
        }
        if (canao_type_vocab_size > 0 && (tt[i] < 0 || tt[i] >= canao_type_vocab_size)) {
            snprintf(err, n, "token type id %lld (row %ld, position %ld) is outside 0..%ld", (long long)tt[i],
                     i / seq, i % seq, canao_type_vocab_size - 1);
            return -1;
        }
    }
    const float *W = (const float *)((const char *)m->map + CANAO_WEIGHTS_HEADER);
    float *row_out[16];
    for (int b = 0; b < batch; b++) {
        for (long i = 0; i < canao_num_outputs && i < 16; i++) row_out[i] = outputs[i] + (long)b * seq;
        const long o = (long)b * seq;
        const long rb = block_rows(m, seq);
        job_t job = {W, m->arena, m->scratch, seq, rb, (seq + rb - 1) / rb, ids + o, tt + o, mask + o, row_out, 0};
        for (job.phase = 0; job.phase < canao_num_phases; job.phase++)
            pool_parallel(m->pool, phase_block, &job, job.nblocks);
    }
    if (canao_profiling) {
        atomic_fetch_add(&prof_runs, batch);
        atomic_fetch_add(&prof_join_ns, atomic_exchange(&m->pool->join_ns, 0));
    }
    return 0;
}

void canao_close(canao_model *m) {
    if (!m) return;
    if (canao_profiling) profile_report();
    pool_destroy(m->pool);
    if (m->map) munmap(m->map, m->map_bytes);
    free(m->arena);
    free(m->scratch);
    free(m);
}
