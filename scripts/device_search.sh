#!/usr/bin/env bash
# The GPU half of `canao search --preset full`: augmented data and the teacher's cached logits,
# the phase-1 supernet, the search (ranked by the
# latency predictor fitted on the target CPU, .gpu/predictor.json), phase-2 distillation of the
# chosen architecture and of the uniformly shrunk baselines, F1 of each on held-out dev
# questions. Training is fitted to time budgets (a lease is minutes). The device stages
# (measure, compile, verify, time) run afterwards on the target with
# `canao search ... --resume` on the folder this returns.
# Expects .gpu/teacher and .gpu/data/squad/*.json; writes to $OUT the run folder (state, log,
# the chosen model in float16) as search.tgz cut into 15 MiB parts (the device tool returns
# files of at most 16 MiB): `cat search.tgz.part-* | tar xz -C DIR` puts it back together.
# It calls the Python API rather than the CLI: the GPU image lacks the web app's packages.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
work=/tmp/search-run
rm -rf "$work"
timeout "${PY_LIMIT:-330}" python3 - "$work" "${BUDGET:-40}" "${TINY:-0}" <<'PY'
import json, os, sys, time, torch
from pathlib import Path
from canao.compress.pipeline import Job, run
work, budget, tiny = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
torch.set_num_threads(16 if torch.cuda.is_available() else 1)
from canao.compress.teacher_cache import WindowSettings
over = dict(phase2_seconds=float(os.environ.get("PHASE2_S", 20)), search_dev=300, eval_dev=2000, proposals=60)
sup = dict(seconds=float(os.environ.get("SUPERNET_S", 80)))
if tiny:  # the same script on a CPU, minutes: a check before spending device time
    over.update(batch_size=4, phase2_seconds=5, search_dev=8, select_dev=8, eval_dev=24, proposals=8)
    sup.update(train_limit=40, copies=1, window=WindowSettings(192, 64), batch_size=4, seconds=20,
               importance_batches=1, reference_dev=8)
job = Job(teacher=Path(".gpu/teacher"), data=Path(".gpu/data"), out=Path(work), budget_ms=budget, threads=1, seq=384,
          preset="full", measure=False, predictor_file=Path(".gpu/predictor.json"), overrides=over,
          supernet_overrides=sup)
t0 = time.time()
res = run(job, progress=False)
print(json.dumps({"wall_s": time.time() - t0, "chosen": res["chosen"]}), flush=True)
PY
echo "python exit $?"
cd "$work" 2>/dev/null || exit 1
tar cf - state.json search-log.jsonl predictor.json model | gzip -1 | split -b 15m - "$out/search.tgz.part-"
ls -la "$out"
