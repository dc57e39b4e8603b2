"""Auto-tuning of the generated GEMMs, with a persistent tuning database.

A GEMM's best schedule (register tile mr x nr, K block) depends on its shape, its epilogue
and the machine, not on the model it sits in. So the tuner keys each result by the target
(ISA + CPU model + tuner version) and the kernel signature (precision, row-block bucket,
N, K, and a costly epilogue function such as GELU, timed with the GEMM), and keeps it in one JSON database shared by every compile:
~/.cache/canao/tuning.json ($CANAO_CACHE/tuning.json; $CANAO_TUNING_DB names the file).
Compiling a new architecture of the search space whose shapes were seen before
measures nothing.

Measuring: every candidate schedule of every unseen signature is generated with the
same code generator as the model (codegen.gemm.gemm_loop / tile_source) into one small
standalone harness, compiled once, that packs the same random weights for each
candidate, checks every candidate's result against the first, and times them
interleaved (round-robin), with the weights evicted from the caches before each call
as in a forward pass (warm weights favoured schedules that lose in the model), each
call on the thread's own CPU clock
(CLOCK_THREAD_CPUTIME_ID): on a shared core, time the OS gave to other processes
does not count against a candidate. The median of the repeats decides.

The database is written atomically (a temporary file in the same folder, fsync,
rename) under an advisory lock, re-reading and merging first, so concurrent compiles
never lose each other's entries and a crash mid-write leaves the previous version.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CanaoError
from ..fileio import read_json_object, update_json_object
from ..paths import cache_dir
from .build import KERNEL_DIR, compiler
from .codegen.gemm import TILE_SOURCES, Schedule, gemm_loop, gemm_loop_int8, gemm_mode
from .targets import Target, cpu_model

TUNER_VERSION = 6  # bump when generated kernels change so old measurements are not reused
DEFAULT_M = 96     # the row block the runtime hands a GEMM (canao_block_rows)


def db_path() -> Path:
    env = os.environ.get("CANAO_TUNING_DB")
    return Path(env) if env else cache_dir() / "tuning.json"



def target_key(target: Target) -> str:
    return f"{target.name}|{cpu_model()}|v{TUNER_VERSION}"


def m_bucket(m: int) -> int:
    """Row counts tune alike within a power of two (16 .. 512)."""
    return min(512, max(16, 1 << math.ceil(math.log2(max(1, m)))))


EPILOGUE_COSTS = ("gelu",)  # epilogue functions costly enough to move a GEMM's best schedule


@dataclass(frozen=True)
class GemmSig:
    precision: str
    m: int  # bucket
    n: int
    k: int
    epilogue: str = ""  # "gelu" when the GEMM ends in one (timed with it); plain GEMMs keep their old keys

    def key(self) -> str:
        return f"gemm|{self.precision}|M{self.m}|N{self.n}|K{self.k}" + (f"|{self.epilogue}" if self.epilogue else "")


def epilogue_kind(expr) -> str:
    """The costly function in an epilogue expression tree (("gelu", ("add", ("in", 0), ("in", 1))) -> "gelu")."""
    if isinstance(expr, tuple) and expr:
        if expr[0] in EPILOGUE_COSTS:
            return expr[0]
        return next((e for e in map(epilogue_kind, expr[1:]) if e), "")
    return ""


# -- the database ----------------------------------------------------------------


class TuningDB:
    """{target key: {signature key: {"schedule": {...}, "gflops": ..., ...}}} in one JSON file."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else db_path()
        self.data = self._read()

    def _read(self) -> dict:
        data = read_json_object(self.path, "tuning database", _valid_tuning)
        return data or {"format": 1, "targets": {}}

    def get(self, target: Target, sig: GemmSig) -> dict | None:
        return self.data["targets"].get(target_key(target), {}).get(sig.key())

    def put_many(self, target: Target, entries: dict[str, dict]) -> None:
        """Merge entries into the file (under a lock, re-reading first) and write it atomically."""
        def add(data):
            data.setdefault("format", 1)
            data.setdefault("targets", {}).setdefault(target_key(target), {}).update(entries)

        self.data = update_json_object(self.path, "tuning database", add, _valid_tuning)


def _valid_tuning(data: dict) -> bool:
    return data.get("format") == 1 and isinstance(data.get("targets"), dict)



# -- candidates and the harness ----------------------------------------------------


TUNABLE_MODES = ("f32", "bf16", "int8")  # bf16dot needs an AVX512-BF16 host to time; it uses defaults


def candidates(target: Target, k: int, mode: str = "f32") -> list[Schedule]:
    """Register tiles that fit the register file (accumulators + B vectors + a broadcast,
    + a temporary for int8), times a few K blocks (int8 tiles run the whole K)."""
    regs = 32 if target.vl == 16 else 16
    tiles = [(8, 2), (6, 4), (12, 2), (14, 2), (8, 3), (4, 4)] if regs == 32 else \
        [(6, 2), (4, 3), (5, 2), (8, 1), (3, 3), (2, 4), (4, 2)]
    extra = 2 if mode == "int8" else 1
    tiles = [(mr, nv) for mr, nv in tiles if mr * nv + nv + extra <= regs]
    kcs = [k] if mode == "int8" else sorted({min(k, kc) for kc in (192, 384, 1 << 30)})
    return [Schedule(mr, nv * target.vl, kc) for mr, nv in tiles for kc in kcs]


def harness_source(target: Target, sigs: list[GemmSig], cands: dict[GemmSig, list[Schedule]], reps: int) -> str:
    modes = {sig: gemm_mode(sig.precision, target, sig.n) for sig in sigs}
    tiles = sorted({(modes[sig], s.mr, s.nr) for sig, cs in cands.items() for s in cs})
    mode_id = {"f32": 0, "bf16": 1, "int8": 2}
    fns, tables = [], []
    for si, sig in enumerate(sigs):
        names = []
        mode = modes[sig]
        for ci, sch in enumerate(cands[sig]):
            name = f"g{si}_{ci}"
            names.append(name)
            ptype = {"f32": "float", "bf16": "uint16_t", "int8": "int8_t"}[mode]
            expr = f"v{sig.epilogue}(x)" if sig.epilogue else "x"
            body = gemm_loop_int8(sch, sig.k, sig.n, expr=expr) if mode == "int8" else \
                gemm_loop(sch, sig.k, sig.n, expr=expr, tile_suffix="_bf16" if mode == "bf16" else "")
            fns.append(f"static void {name}(const float *A, long lda, const void *Pv, const int32_t *CS, const float *SW, "
                       f"float *C, long ldc, long r0, long r1, float *scratch) {{\n"
                       f"    const {ptype} *P = Pv; (void)CS; (void)SW; (void)scratch;\n" + body + "}")
        nrs = ", ".join(str(s.nr) for s in cands[sig])
        tables.append(f"    {{{sig.m}, {sig.n}, {sig.k}, {mode_id[mode]}, {len(names)}, {{{', '.join(names)}}}, {{{nrs}}}}},")
    max_c = max(len(c) for c in cands.values())
    return f"""/* canao tuner harness: {len(sigs)} GEMM signatures, candidates timed round-robin on the thread CPU clock */
#include "{target.vec_header}"
#include "canao_kernels.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

{chr(10).join(TILE_SOURCES[kind](mr, nr, target.vl) for kind, mr, nr in tiles)}

{chr(10).join(fns)}

typedef void (*gemm_fn)(const float *, long, const void *, const int32_t *, const float *, float *, long, long, long, float *);
typedef struct {{ long M, N, K; int mode; int nc; gemm_fn fn[{max_c}]; int nr[{max_c}]; }} sig_t;

/* W [K][N] -> the panel layout of mode 0 (fp32 [N/nr][K][nr]), 1 (bf16, same) or 2 (int8 [N/nr][K/4][nr][4],
 * with column sums x CANAO_ACT_OFFSET and scales) */
static void *pack(int mode, const float *W, long K, long N, int nr, int32_t **cs, float **sw) {{
    const long np = (N + nr - 1) / nr, kp = (K + 3) / 4 * 4;
    *cs = calloc(np * nr + 16, 4);
    *sw = malloc((np * nr + 16) * 4);
    for (long i = 0; i < np * nr + 16; i++) (*sw)[i] = 1.0f / 126;
    if (mode == 2) {{
        int8_t *P = aligned_alloc(64, ((size_t)np * kp * nr + 63) / 64 * 64);
        for (long p = 0; p < np; p++)
            for (long k = 0; k < kp; k++)
                for (int j = 0; j < nr; j++) {{
                    const long col = p * nr + j;
                    const int8_t q = (k < K && col < N) ? (int8_t)lrintf(W[k * N + col] * 126) : 0;
                    P[((p * (kp / 4) + k / 4) * nr + j) * 4 + k % 4] = q;
                    (*cs)[col] += CANAO_ACT_OFFSET * q;
                }}
        return P;
    }}
    const size_t es = mode == 1 ? 2 : 4;
    char *P = aligned_alloc(64, (np * K * nr * es + 63) / 64 * 64);
    for (long p = 0; p < np; p++)
        for (long k = 0; k < K; k++)
            for (int j = 0; j < nr; j++) {{
                const long col = p * nr + j;
                float v = col < N ? W[k * N + col] : 0.0f;
                uint32_t u;
                memcpy(&u, &v, 4);
                if (mode == 1) {{ uint16_t h = (uint16_t)(u >> 16); memcpy(P + ((p * K + k) * nr + j) * 2, &h, 2); }}
                else memcpy(P + ((p * K + k) * nr + j) * 4, &v, 4);
            }}
    return P;
}}
static const sig_t SIGS[] = {{
{chr(10).join(tables)}
}};

static double now(void) {{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}}
/* As in a forward pass: the weights come from memory (a model's do not fit the caches and each is read
 * once), the activations are warm (the previous kernel wrote them). Evict everything, re-read A. */
static char *flush_buf;
static volatile float sink;
static void cold(const float *A, long n) {{
    const long bytes = 64L << 20;
    if (!flush_buf) flush_buf = calloc(bytes, 1);
    for (long i = 0; i < bytes; i += 64) flush_buf[i]++;
    float s = 0;
    for (long i = 0; i < n; i += 16) s += A[i];
    sink = s;
}}
static int cmp(const void *a, const void *b) {{ double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }}

int main(void) {{
    const int reps = {reps};
    srand(1);
    printf("[");
    for (unsigned s = 0; s < sizeof SIGS / sizeof SIGS[0]; s++) {{
        const sig_t *g = &SIGS[s];
        const long M = g->M, N = g->N, K = g->K;
        float *A = aligned_alloc(64, ((size_t)M * K * 4 + 63) / 64 * 64), *W = malloc((size_t)K * N * 4);
        for (long i = 0; i < M * K; i++) A[i] = (float)rand() / RAND_MAX - 0.5f;
        for (long i = 0; i < K * N; i++) W[i] = (float)rand() / RAND_MAX - 0.5f;
        void *P[{max_c}];
        float *C[{max_c}], *SW[{max_c}];
        int32_t *CS[{max_c}];
        float *scratch = aligned_alloc(64, ((size_t)(M + 16) * (K + 4) * 4 + 4096) / 64 * 64);
        for (int c = 0; c < g->nc; c++) {{
            P[c] = pack(g->mode, W, K, N, g->nr[c], &CS[c], &SW[c]);
            C[c] = aligned_alloc(64, ((size_t)M * N * 4 + 63) / 64 * 64);
            g->fn[c](A, K, P[c], CS[c], SW[c], C[c], N, 0, M, scratch);  /* warm-up, and the result to compare */
        }}
        double t[{max_c}][{reps}];
        for (int r = 0; r < reps; r++)
            for (int c = 0; c < g->nc; c++) {{
                cold(A, M * K);
                const double t0 = now();
                g->fn[c](A, K, P[c], CS[c], SW[c], C[c], N, 0, M, scratch);
                t[c][r] = now() - t0;
            }}
        printf("%s{{\\"m\\": %ld, \\"n\\": %ld, \\"k\\": %ld, \\"results\\": [", s ? ", " : "", M, N, K);
        for (int c = 0; c < g->nc; c++) {{
            double err = 0;
            for (long i = 0; i < M * N; i++) {{ double d = C[c][i] - C[0][i]; if (d < 0) d = -d; if (d > err) err = d; }}
            qsort(t[c], reps, sizeof(double), cmp);
            printf("%s{{\\"median_s\\": %.9f, \\"min_s\\": %.9f, \\"max_abs_diff\\": %.3g}}", c ? ", " : "", t[c][reps / 2], t[c][0], err);
        }}
        for (int c = 0; c < g->nc; c++) {{ free(P[c]); free(C[c]); free(CS[c]); free(SW[c]); }}
        printf("]}}");
        free(A); free(W); free(scratch);
        fflush(stdout);
    }}
    printf("]\\n");
    return 0;
}}
"""


def measure(target: Target, sigs: list[GemmSig], reps: int = 7, log=None) -> dict[str, dict]:
    """Time every candidate of every signature; the best schedule of each, as DB entries."""
    cands = {sig: candidates(target, sig.k, gemm_mode(sig.precision, target, sig.n)) for sig in sigs}
    src = harness_source(target, sigs, cands, reps)
    with tempfile.TemporaryDirectory(prefix="canao-tune-") as tmp:
        c_file, exe = Path(tmp) / "harness.c", Path(tmp) / "harness"
        c_file.write_text(src)
        t0 = time.perf_counter()
        cmd = [compiler(), "-O3", "-std=gnu11", "-fno-math-errno", *target.cflags, "-I", str(KERNEL_DIR),
               str(c_file), "-o", str(exe), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CanaoError(f"tuner: harness compilation failed: {proc.stderr.strip()[:500]}")
        cc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        proc = subprocess.run([str(exe)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CanaoError(f"tuner: harness failed: {proc.stderr.strip()[:500]}")
        run_s = time.perf_counter() - t0
    out = json.loads(proc.stdout)
    entries = {}
    for sig, res in zip(sigs, out):
        flops = 2.0 * sig.m * sig.n * sig.k
        bad = [i for i, r in enumerate(res["results"]) if not r["max_abs_diff"] <= 1e-3 * math.sqrt(sig.k)]
        if bad:
            raise CanaoError(f"tuner: candidates {[asdict(cands[sig][i]) for i in bad]} of {sig.key()} compute "
                             f"different results; this is a code generator bug")
        best = min(range(len(res["results"])), key=lambda i: res["results"][i]["median_s"])
        plain = Schedule(*target.int8_tile, sig.k) if gemm_mode(sig.precision, target, sig.n) == "int8" else \
            Schedule(target.gemm_mr, target.gemm_nr, min(sig.k, Schedule(1, 1).kc))
        default = next((i for i, s in enumerate(cands[sig]) if s == plain), best)
        entries[sig.key()] = {
            "schedule": asdict(cands[sig][best]),
            "gflops": flops / res["results"][best]["median_s"] / 1e9,
            "default_gflops": flops / res["results"][default]["median_s"] / 1e9,
            "candidates": len(cands[sig]),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if log:
            log(f"tuned {sig.key()}: {entries[sig.key()]['schedule']} {entries[sig.key()]['gflops']:.1f} GFLOP/s "
                f"(default tile {entries[sig.key()]['default_gflops']:.1f})")
    if log:
        log(f"tuner: {len(sigs)} signatures, {sum(len(c) for c in cands.values())} candidates, "
            f"harness cc {cc_s:.1f} s, run {run_s:.1f} s")
    return entries


def gemm_signatures(g, precision: str, target: Target, m: int = DEFAULT_M) -> dict[str, GemmSig]:
    """op output -> signature, for every matmul with constant weights (in the precision it runs in)."""
    sigs = {}
    for op in g.ops:
        if op.kind == "matmul" and g.is_const(op.inputs[1]):
            k, n = g.consts[op.inputs[1]].shape
            mode = gemm_mode(precision, target, int(n))
            if mode in TUNABLE_MODES:
                prec = {"f32": "fp32", "bf16": "bf16", "int8": "int8"}[mode]
                sigs[op.output] = GemmSig(prec, m_bucket(m), int(n), int(k), epilogue_kind(op.attrs.get("epilogue")))
    return sigs


def tune_graph(g, target: Target, precision: str = "fp32", measure_missing: bool = True,
               db: TuningDB | None = None, m: int = DEFAULT_M, log=None) -> tuple[dict[str, Schedule], dict]:
    """Schedules for the graph's GEMMs from the database, measuring unseen signatures first
    (when measure_missing). Returns (op output -> Schedule, report)."""
    t0 = time.perf_counter()
    db = db or TuningDB()
    sigs = gemm_signatures(g, precision, target, m)
    unique = list(dict.fromkeys(sigs.values()))
    missing = [s for s in unique if db.get(target, s) is None]
    measured = 0
    if measure_missing and missing:
        entries = measure(target, missing, log=log)
        db.put_many(target, entries)
        measured = len(entries)
    schedules = {}
    for out, sig in sigs.items():
        entry = db.get(target, sig)
        if entry:
            schedules[out] = Schedule(**entry["schedule"])
    report = {"db": str(db.path), "signatures": len(unique), "measured": measured,
              "reused": len(unique) - len(missing), "untuned": len(unique) - measured - (len(unique) - len(missing)),
              "seconds": time.perf_counter() - t0}
    return schedules, report
