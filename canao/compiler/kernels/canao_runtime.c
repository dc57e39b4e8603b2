/* The fixed part of every artifact: weights mapping, arena, thread scratch, batching. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "canao.h"

extern const long canao_scratch_floats;
void canao_forward(const float *W, char *arena, float *scratch, int threads, long S, const int64_t *input_ids,
                   const int64_t *token_type_ids, const int64_t *attention_mask, float *const *outputs);

#define WEIGHTS_MAGIC "CANAOW01"
#define HEADER_BYTES 64

struct canao_model {
    void *map;
    size_t map_bytes;
    char *arena;
    float *scratch;
    int threads;
};

static int cpu_ok(char *err, int n) {
    __builtin_cpu_init();
    int ok = strcmp(canao_target, "avx512") == 0
                 ? __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
                 : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!ok) snprintf(err, n, "this artifact was built for %s, which this CPU does not support", canao_target);
    return ok;
}

int canao_set_threads(canao_model *m, int threads) {
    if (threads < 1) threads = 1;
    free(m->scratch);
    m->scratch = aligned_alloc(64, ((size_t)threads * canao_scratch_floats * sizeof(float) + 63) / 64 * 64);
    m->threads = threads;
    return m->scratch ? 0 : -1;
}

canao_model *canao_open(const char *path, int threads, char *err, int n) {
    if (!cpu_ok(err, n)) return NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) { snprintf(err, n, "cannot open weights %s", path); return NULL; }
    struct stat st;
    fstat(fd, &st);
    if ((size_t)st.st_size != HEADER_BYTES + (size_t)canao_weight_bytes) {
        snprintf(err, n, "weights %s has %ld bytes, this library expects %ld", path, (long)st.st_size,
                 (long)(HEADER_BYTES + canao_weight_bytes));
        close(fd);
        return NULL;
    }
    void *map = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) { snprintf(err, n, "cannot map weights %s", path); return NULL; }
    if (memcmp(map, WEIGHTS_MAGIC, 8) != 0) {
        snprintf(err, n, "%s is not a canao weights file", path);
        munmap(map, st.st_size);
        return NULL;
    }
    canao_model *m = calloc(1, sizeof *m);
    m->map = map;
    m->map_bytes = st.st_size;
    m->arena = aligned_alloc(64, (canao_arena_bytes + 63) / 64 * 64 + 64);
    if (!m->arena || canao_set_threads(m, threads) != 0) {
        snprintf(err, n, "out of memory");
        canao_close(m);
        return NULL;
    }
    return m;
}

int canao_run(canao_model *m, int batch, int seq, const int64_t *ids, const int64_t *tt, const int64_t *mask,
              float *const *outputs, char *err, int n) {
    if (seq < 1 || seq > canao_max_seq) {
        snprintf(err, n, "sequence length %d is outside 1..%ld (compile with a larger --max-seq)", seq, canao_max_seq);
        return -1;
    }
    const float *W = (const float *)((const char *)m->map + HEADER_BYTES);
    float *row_out[16];
    for (int b = 0; b < batch; b++) {
        for (long i = 0; i < canao_num_outputs && i < 16; i++) row_out[i] = outputs[i] + (long)b * seq;
        long o = (long)b * seq;
        canao_forward(W, m->arena, m->scratch, m->threads, seq, ids + o, tt + o, mask + o, row_out);
    }
    return 0;
}

void canao_close(canao_model *m) {
    if (!m) return;
    if (m->map) munmap(m->map, m->map_bytes);
    free(m->arena);
    free(m->scratch);
    free(m);
}
