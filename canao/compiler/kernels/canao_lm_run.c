/* canao-run for decoder artifacts: the compiled language model without Python, for a phone,
 * a board or qemu. Linked with the artifact's model.c (which includes the decoder runtime).
 *
 *   canao-run WEIGHTS --ids 1,2,3 --generate N [--threads T] [--logits OUT.f32]
 *       greedy-generate N tokens after the prompt ids; prints {"ids": [...]} (one JSON line);
 *       --logits writes the logits that chose the first generated token (float32, vocab values)
 *   canao-run WEIGHTS --bench-decode [--context 64] [--steps 32] [--warmup 4] [--ttft-prompt 128]
 *                     [--ttft-runs 5] [--threads T]
 *       decode speed: prefill `context` tokens, time `steps` single-token steps; time to first
 *       token of a `ttft-prompt`-token prompt; prints one JSON line
 * Errors: one line on stderr; exit 1 at run time, 2 for bad usage. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "canao_lm.h"
#include "canao_stats.h"

static int usage(const char *msg) {
    fprintf(stderr, "canao-run: %s (see canao-run --help)\n", msg);
    return 2;
}

static int argmax(const float *x, long n) {
    int best = 0;
    for (long i = 1; i < n; i++)
        if (x[i] > x[best]) best = (int)i;
    return best;
}

static int step(canao_lm *m, const int32_t *ids, int n, int pos) {
    char err[512];
    if (canao_lm_forward(m, ids, n, pos, err, sizeof err) != 0) {
        fprintf(stderr, "canao-run: %s\n", err);
        exit(1);
    }
    return argmax(canao_lm_logits(m), canao_lm_vocab);
}

int main(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        puts("usage: canao-run WEIGHTS --ids 1,2,3 --generate N [--threads T] [--logits OUT.f32]\n"
             "       canao-run WEIGHTS --bench-decode [--context 64] [--steps 32] [--warmup 4] "
             "[--ttft-prompt 128] [--ttft-runs 5] [--threads T]");
        return 0;
    }
    if (argc < 3) return usage("expected WEIGHTS and a mode (--ids ... --generate N, or --bench-decode)");
    const char *weights = argv[1], *ids_arg = NULL, *logits_out = NULL;
    int threads = 1, generate = 0, bench = 0, context = 64, steps = 32, warmup = 4, ttft_prompt = 128, ttft_runs = 5;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--bench-decode")) { bench = 1; continue; }
        if (!v) return usage("missing value after an option");
        if (!strcmp(a, "--ids")) ids_arg = v;
        else if (!strcmp(a, "--logits")) logits_out = v;
        else if (!strcmp(a, "--generate")) generate = atoi(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--context")) context = atoi(v);
        else if (!strcmp(a, "--steps")) steps = atoi(v);
        else if (!strcmp(a, "--warmup")) warmup = atoi(v);
        else if (!strcmp(a, "--ttft-prompt")) ttft_prompt = atoi(v);
        else if (!strcmp(a, "--ttft-runs")) ttft_runs = atoi(v);
        else return usage("unknown option");
        i++;
    }
    if (threads < 1 || steps < 1 || warmup < 0 || context < 1 || ttft_prompt < 1 || ttft_runs < 1)
        return usage("counts must be positive");
    if (!bench && (!ids_arg || generate < 1)) return usage("give --ids and --generate N, or --bench-decode");
    char err[512];
    canao_lm *m = canao_lm_open(weights, threads, err, sizeof err);
    if (!m) {
        fprintf(stderr, "canao-run: %s\n", err);
        return 1;
    }
    if (!bench) {
        int n = 1;
        for (const char *c = ids_arg; *c; c++) n += *c == ',';
        int32_t *ids = malloc(sizeof(int32_t) * (n + generate));
        char *copy = strdup(ids_arg), *save = NULL;
        n = 0;
        for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) ids[n++] = atoi(tok);
        free(copy);
        if (n + generate > canao_lm_max_ctx) {
            fprintf(stderr, "canao-run: %d prompt + %d new tokens exceed the context of %ld\n", n, generate, canao_lm_max_ctx);
            return 1;
        }
        int next = step(m, ids, n, 0);
        if (logits_out) {
            FILE *f = fopen(logits_out, "wb");
            if (!f || fwrite(canao_lm_logits(m), sizeof(float), canao_lm_vocab, f) != (size_t)canao_lm_vocab) {
                fprintf(stderr, "canao-run: cannot write %s\n", logits_out);
                return 1;
            }
            fclose(f);
        }
        printf("{\"ids\": [");
        for (int g = 0; g < generate; g++) {
            printf(g ? ", %d" : "%d", next);
            ids[n + g] = next;
            if (g + 1 < generate) next = step(m, &ids[n + g], 1, n + g);
        }
        printf("]}\n");
        canao_lm_close(m);
        return 0;
    }
    if (context + warmup + steps > canao_lm_max_ctx || ttft_prompt > canao_lm_max_ctx) {
        fprintf(stderr, "canao-run: context %d + %d steps exceed the artifact's context of %ld\n", context,
                warmup + steps, canao_lm_max_ctx);
        return 1;
    }
    const int longest = context > ttft_prompt ? context : ttft_prompt;
    int32_t *prompt = malloc(sizeof(int32_t) * longest);
    unsigned s = 12345;
    for (int i = 0; i < longest; i++) prompt[i] = (int32_t)((s = s * 1103515245u + 12345u) >> 8) % (int32_t)canao_lm_vocab;
    /* decode: a warm-up round, then the timed one from a fresh prefill (as canao.baselines.protocol) */
    double *t = malloc(sizeof(double) * (steps > ttft_runs ? steps : ttft_runs));
    int next = step(m, prompt, context, 0);
    for (int i = 0; i < warmup; i++) next = step(m, &next, 1, context + i);
    next = step(m, prompt, context, 0);
    for (int i = 0; i < steps; i++) {
        const double t0 = now_ms();
        const int32_t tok = next;
        next = step(m, &tok, 1, context + i);
        t[i] = now_ms() - t0;
    }
    const double dmed = quantile(t, steps, 0.5), dp90 = quantile(t, steps, 0.9);
    step(m, prompt, ttft_prompt, 0);  /* warm-up */
    for (int i = 0; i < ttft_runs; i++) {
        const double t0 = now_ms();
        step(m, prompt, ttft_prompt, 0);
        t[i] = now_ms() - t0;
    }
    printf("{\"context\": %d, \"threads\": %d, \"steps\": %d, \"warmup\": %d, \"decode_ms_median\": %.4f, "
           "\"decode_ms_p90\": %.4f, \"tokens_per_s\": %.3f, \"ttft_prompt\": %d, \"ttft_ms_median\": %.4f, "
           "\"target\": \"%s\"}\n",
           context, threads, steps, warmup, dmed, dp90, 1e3 / dmed, ttft_prompt, quantile(t, ttft_runs, 0.5), canao_lm_target);
    canao_lm_close(m);
    return 0;
}
