/* Time (and optionally check) a canao artifact's library without Python:
 *   compiler_c_bench LIB WEIGHTS SEQ THREADS RUNS [INPUTS.bin EXPECTED.bin]
 * If WEIGHTS does not exist it is filled with small deterministic values (timing only).
 * INPUTS.bin: int64 ids, type ids, mask [SEQ each]; EXPECTED.bin: float32 start, end [SEQ each].
 * Prints one JSON line: median and p90 ms over RUNS after 3 warm-up runs, and max abs error. */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef void *(*open_fn)(const char *, int, char *, int);
typedef int (*run_fn)(void *, int, int, const int64_t *, const int64_t *, const int64_t *, float *const *, char *, int);

static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return (x > y) - (x < y); }

int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: %s LIB WEIGHTS SEQ THREADS RUNS [INPUTS EXPECTED]\n", argv[0]); return 2; }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    int seq = atoi(argv[3]), threads = atoi(argv[4]), runs = atoi(argv[5]);
    if (access(argv[2], F_OK) != 0) {
        long bytes = *(const long *)dlsym(lib, "canao_weight_bytes");
        FILE *f = fopen(argv[2], "wb");
        char header[64] = "CANAOW01";
        fwrite(header, 1, 64, f);
        for (long i = 0; i < bytes / 4; i++) { float v = 0.02f * (float)((i * 2654435761u) % 1000) / 1000.0f - 0.01f; fwrite(&v, 4, 1, f); }
        fclose(f);
    }
    char err[512] = "";
    void *m = ((open_fn)dlsym(lib, "canao_open"))(argv[2], threads, err, sizeof err);
    if (!m) { fprintf(stderr, "open: %s\n", err); return 1; }
    int64_t *in = calloc(3 * (size_t)seq, sizeof(int64_t));
    float *expected = NULL, *out = calloc(2 * (size_t)seq, sizeof(float));
    if (argc >= 8) {
        FILE *f = fopen(argv[6], "rb"); fread(in, sizeof(int64_t), 3 * (size_t)seq, f); fclose(f);
        expected = calloc(2 * (size_t)seq, sizeof(float));
        f = fopen(argv[7], "rb"); fread(expected, sizeof(float), 2 * (size_t)seq, f); fclose(f);
    } else {
        for (int i = 0; i < seq; i++) { in[i] = 1 + (i * 7919) % 900; in[2 * seq + i] = 1; }
    }
    float *outs[2] = {out, out + seq};
    run_fn run = (run_fn)dlsym(lib, "canao_run");
    double *ms = calloc(runs, sizeof(double));
    for (int i = 0; i < 3 + runs; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (run(m, 1, seq, in, in + seq, in + 2 * seq, outs, err, sizeof err)) { fprintf(stderr, "run: %s\n", err); return 1; }
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (i >= 3) ms[i - 3] = (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6;
    }
    qsort(ms, runs, sizeof(double), cmp);
    double max_err = 0;
    if (expected) for (int i = 0; i < 2 * seq; i++) max_err = fmax(max_err, fabs(out[i] - expected[i]));
    char err_text[32] = "null";
    if (expected) snprintf(err_text, sizeof err_text, "%.3g", max_err);
    printf("{\"lib\": \"%s\", \"target\": \"%s\", \"seq\": %d, \"threads\": %d, \"median_ms\": %.3f, \"p90_ms\": %.3f, \"max_abs_err\": %s}\n",
           argv[1], (const char *)dlsym(lib, "canao_target"), seq, threads, ms[runs / 2], ms[(int)(0.9 * (runs - 1))], err_text);
    return 0;
}
