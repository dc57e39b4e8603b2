/* The decode step's memory floor, measured in C: stream a file's bytes (a decoder's packed
 * weights, mapped and pre-faulted as the runtime maps them) with T threads, each reading its own
 * contiguous part with 32-byte loads, as the GEMVs do; best of R passes, in GB/s on stdout.
 *
 *   cc -O3 -march=native -pthread stream_read.c -o stream_read && ./stream_read FILE THREADS [PASSES] */
#include <fcntl.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

typedef struct { const unsigned char *p; size_t n; long long sink; } part_t;

static void *read_part(void *arg) {
    part_t *t = arg;
    __m256i acc = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 128 <= t->n; i += 128) {  /* four loads in flight, an add each: bound by the memory */
        acc = _mm256_add_epi64(acc, _mm256_loadu_si256((const __m256i *)(t->p + i)));
        acc = _mm256_add_epi64(acc, _mm256_loadu_si256((const __m256i *)(t->p + i + 32)));
        acc = _mm256_add_epi64(acc, _mm256_loadu_si256((const __m256i *)(t->p + i + 64)));
        acc = _mm256_add_epi64(acc, _mm256_loadu_si256((const __m256i *)(t->p + i + 96)));
    }
    long long s[4];
    _mm256_storeu_si256((__m256i *)s, acc);
    for (; i < t->n; i++) s[0] += t->p[i];
    t->sink = s[0] + s[1] + s[2] + s[3];
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s FILE THREADS [PASSES]\n", argv[0]);
        return 2;
    }
    const int threads = atoi(argv[2]), passes = argc > 3 ? atoi(argv[3]) : 10;
    const int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || threads < 1 || threads > 64) {
        fprintf(stderr, "cannot read %s (or bad thread count)\n", argv[1]);
        return 1;
    }
    const unsigned char *p = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) return 1;
    const size_t chunk = (st.st_size / threads) & ~(size_t)127;
    double best = 0;
    long long sink = 0;
    for (int r = 0; r < passes; r++) {
        part_t parts[64];
        pthread_t tids[64];
        const double t0 = now();
        for (int t = 0; t < threads; t++) {
            parts[t] = (part_t){p + t * chunk, t == threads - 1 ? st.st_size - t * chunk : chunk, 0};
            pthread_create(&tids[t], NULL, read_part, &parts[t]);
        }
        for (int t = 0; t < threads; t++) {
            pthread_join(tids[t], NULL);
            sink += parts[t].sink;
        }
        const double gbs = st.st_size / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.3f\n", best);
    return sink == 42 ? 3 : 0;  /* keeps the reads */
}
