/* Timing statistics of the standalone runners (canao_run.c, canao_lm_run.c): one clock and one
 * quantile, numpy's default (linear between the closest ranks), as canao's Python timings report. */
#ifndef CANAO_STATS_H
#define CANAO_STATS_H
#include <stdlib.h>
#include <time.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* the q-quantile of v[0..n-1] (sorts v in place) */
static double quantile(double *v, int n, double q) {
    qsort(v, n, sizeof *v, cmp_double);
    const double pos = q * (n - 1);
    const int i = (int)pos;
    return i + 1 < n ? v[i] + (pos - i) * (v[i + 1] - v[i]) : v[n - 1];
}
#endif
