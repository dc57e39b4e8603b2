/* canao-run: the standalone runner of one artifact (model.c + canao_runtime.c + this file),
 * for devices without Python (phones, boards over ssh/adb) and for qemu.
 *
 *   canao-run WEIGHTS --ids IDS.i64 --batch B --seq S --out OUT.f32 [--type-ids F.i64] [--mask F.i64] [--threads T]
 *       reads B*S int64 token ids, writes every output as raw float32, concatenated in order
 *       (start_logits [B,S], then end_logits [B,S]).
 *   canao-run WEIGHTS --bench --seq S [--threads T] [--warmup 5] [--runs 20]
 *       times canao_run on random ids (fixed seed) and prints one JSON line.
 *
 * Exit status: 0 done; 1 the model failed (open or run); 2 bad arguments or input files. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "canao.h"
#include "canao_stats.h"



#define ERR_LEN 512

static const char *USAGE =
    "usage: canao-run WEIGHTS --ids IDS.i64 --batch B --seq S --out OUT.f32 [--type-ids FILE.i64] [--mask FILE.i64] "
    "[--threads T]\n"
    "       canao-run WEIGHTS --bench --seq S [--threads T] [--warmup 5] [--runs 20]\n"
    "\n"
    "Runs a canao artifact without Python. WEIGHTS is the artifact's weights.bin.\n"
    "  --ids FILE       B*S token ids, int64 little-endian, row-major [B, S]\n"
    "  --type-ids FILE  token type ids, same layout (default: all 0)\n"
    "  --mask FILE      attention mask, same layout (default: all 1)\n"
    "  --batch B        rows in the files (default 1)\n"
    "  --seq S          tokens per row (at most the artifact's max sequence)\n"
    "  --out FILE       float32 outputs, concatenated: start_logits [B, S] then end_logits [B, S]\n"
    "  --threads T      worker threads (default: online CPUs)\n"
    "  --bench          time canao_run on random ids (seed fixed), print one JSON line\n"
    "  --warmup W       untimed runs before timing (default 5)\n"
    "  --runs N         timed runs (default 20)\n"
    "Exit status: 0 ok, 1 the model failed, 2 bad arguments or input files.\n";

static void die(int code, const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "canao-run: ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
    exit(code);
}

static long parse_int(const char *opt, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) die(2, "%s needs an integer in range, got '%s'", opt, v);
    return x;
}

/* exactly n int64 values from path; each in [0, limit) when limit > 0 */
static int64_t *read_i64(const char *opt, const char *path, long n, long limit) {
    FILE *f = fopen(path, "rb");
    if (!f) die(2, "cannot open %s file %s", opt, path);
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (bytes != n * 8) {
        char msg[160];
        snprintf(msg, sizeof msg, "has %ld bytes, expected %ld (batch x seq int64 values)", bytes, n * 8);
        die(2, "%s %s", path, msg);
    }
    int64_t *x = malloc((size_t)n * 8 + 8);
    if (!x || fread(x, 8, (size_t)n, f) != (size_t)n) die(2, "cannot read %s file %s", opt, path);
    fclose(f);
    for (long i = 0; limit > 0 && i < n; i++)
        if (x[i] < 0 || x[i] >= limit) {
            char msg[160];
            snprintf(msg, sizeof msg, "value %lld at index %ld is outside 0..%ld", (long long)x[i], i, limit - 1);
            die(2, "%s: %s", path, msg);
        }
    return x;
}

int main(int argc, char **argv) {
    const char *weights = NULL, *ids_path = NULL, *tt_path = NULL, *mask_path = NULL, *out_path = NULL;
    long batch = 1, seq = 0, threads = sysconf(_SC_NPROCESSORS_ONLN), warmup = 5, runs = 20;
    int bench = 0;
    if (threads < 1) threads = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (!strcmp(a, "--bench")) { bench = 1; continue; }
        if (a[0] == '-' && a[1] == '-') {
            if (i + 1 >= argc) die(2, "%s needs a value (see --help)", a, NULL);
            const char *v = argv[++i];
            if (!strcmp(a, "--ids")) ids_path = v;
            else if (!strcmp(a, "--type-ids")) tt_path = v;
            else if (!strcmp(a, "--mask")) mask_path = v;
            else if (!strcmp(a, "--out")) out_path = v;
            else if (!strcmp(a, "--batch")) batch = parse_int(a, v, 1, 1 << 20);
            else if (!strcmp(a, "--seq")) seq = parse_int(a, v, 1, 1 << 20);
            else if (!strcmp(a, "--threads")) threads = parse_int(a, v, 1, 64);
            else if (!strcmp(a, "--warmup")) warmup = parse_int(a, v, 0, 1 << 20);
            else if (!strcmp(a, "--runs")) runs = parse_int(a, v, 1, 1 << 20);
            else die(2, "unknown option %s (see --help)", a, NULL);
            continue;
        }
        if (weights) die(2, "unexpected argument '%s' (one weights file; see --help)", a, NULL);
        weights = a;
    }
    if (!weights) die(2, "no weights file given (canao-run WEIGHTS ...; see --help)", NULL, NULL);
    if (access(weights, R_OK) != 0) die(2, "cannot read weights file %s", weights, NULL);
    if (seq < 1) die(2, "--seq is required (see --help)", NULL, NULL);
    if (seq > canao_max_seq) {
        char msg[64];
        snprintf(msg, sizeof msg, "%ld", canao_max_seq);
        die(2, "--seq is larger than this artifact's max sequence %s (compile with a larger --max-seq)%s", msg, "");
    }
    if (!bench && (!ids_path || !out_path)) die(2, "--ids and --out are required without --bench (see --help)", NULL, NULL);
    if (bench && (ids_path || out_path || tt_path || mask_path))
        die(2, "--bench takes no --ids/--type-ids/--mask/--out (it uses random ids)", NULL, NULL);
    if (bench) batch = 1;

    const long n = batch * seq;
    int64_t *ids, *tt, *mask;
    if (bench) {
        ids = malloc((size_t)n * 8);
        uint64_t s = 0x9E3779B97F4A7C15ull;  /* fixed seed: every bench times the same input */
        const long vocab = canao_vocab_size > 1 ? canao_vocab_size : 2;
        for (long i = 0; i < n; i++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            ids[i] = 1 + (int64_t)(s % (uint64_t)(vocab - 1));
        }
    } else {
        ids = read_i64("--ids", ids_path, n, canao_vocab_size);
    }
    tt = tt_path ? read_i64("--type-ids", tt_path, n, canao_type_vocab_size) : calloc((size_t)n, 8);
    if (mask_path) {
        mask = read_i64("--mask", mask_path, n, 0);
    } else {
        mask = malloc((size_t)n * 8);
        for (long i = 0; mask && i < n; i++) mask[i] = 1;
    }
    float *out = malloc((size_t)n * canao_num_outputs * sizeof(float));
    float *outputs[16];
    if (!ids || !tt || !mask || !out || canao_num_outputs > 16) die(1, "out of memory", NULL, NULL);
    for (long i = 0; i < canao_num_outputs; i++) outputs[i] = out + i * n;

    char err[ERR_LEN] = "";
    canao_model *m = canao_open(weights, (int)threads, err, ERR_LEN);
    if (!m) die(1, "%s", err, NULL);

    if (!bench) {
        if (canao_run(m, (int)batch, (int)seq, ids, tt, mask, outputs, err, ERR_LEN) != 0) die(1, "%s", err, NULL);
        FILE *f = fopen(out_path, "wb");
        if (!f) die(2, "cannot write --out file %s", out_path, NULL);
        const size_t total = (size_t)n * canao_num_outputs;
        if (fwrite(out, sizeof(float), total, f) != total || fclose(f) != 0) die(1, "writing %s failed", out_path, NULL);
    } else {
        double *ms = malloc(sizeof(double) * runs), sum = 0;
        for (long r = 0; r < warmup + runs; r++) {
            const double t0 = now_ms();
            if (canao_run(m, 1, (int)seq, ids, tt, mask, outputs, err, ERR_LEN) != 0) die(1, "%s", err, NULL);
            if (r >= warmup) ms[r - warmup] = now_ms() - t0;
        }
        for (long r = 0; r < runs; r++) sum += ms[r];
        const double median = quantile(ms, (int)runs, 0.5);  /* sorts ms */
        printf("{\"seq\":%ld,\"threads\":%ld,\"runs\":%ld,\"warmup\":%ld,\"median_ms\":%.4f,\"p90_ms\":%.4f,"
               "\"p95_ms\":%.4f,\"min_ms\":%.4f,\"mean_ms\":%.4f,\"target\":\"%s\"}\n",
               seq, threads, runs, warmup, median, quantile(ms, (int)runs, 0.9),
               quantile(ms, (int)runs, 0.95), ms[0], sum / runs, canao_target);
        free(ms);
    }
    canao_close(m);
    free(ids); free(tt); free(mask); free(out);
    return 0;
}
