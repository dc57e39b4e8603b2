"""`canao search` end to end, as resumable stages recorded in OUT/state.json.

 1 reachable      measure the smallest architecture: an impossible budget stops here
 2 teacher        F1 on the held-out eval slice
 3 calibration    measure candidates through the compiler, fit the latency predictor, held-out error
 4 supernet       importance reordering, then phase-1 sandwich distillation (checkpointed)
 5 search         controllers (RL, evolution, random) over the space, every candidate logged
 6 confirm        measure the best candidates in order of F1: the first within budget is taken
 7 phase2         TinyBERT-style distillation of the chosen architecture (checkpointed)
 8 final          compile, verify against PyTorch, measure p50/p95 (padded and per question),
                  F1 of the compiled model; over budget -> the next confirmed candidate
 9 baselines      uniformly shrunk students with the same phase-2 budget, the teacher
10 report         search log, Pareto PNG, report.md, result.json

A finished stage is never redone with --resume; training stages resume from their
last checkpoint. `measure=False` runs the stages that need no target device (for a
GPU machine) using a predictor file; a later run with measure=True and resume
finishes the device stages on the target.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CanaoError
from ..models.encoders import load_encoder, save_encoder
from ..tasks import squad
from . import report
from .distill import DistillConfig, distill_student, steps_for, train_supernet
from .importance import compute_importance, reorder
from .latency import (LatencyOracle, LatencyPredictor, calibration_set, compile_final, compiler_precisions,
                      holdout_error, per_question_latency, verify_artifact)
from .search import Evaluator, Search, SearchConfig, check_reachable, eval_stride
from .space import Arch, SearchSpace, keep_layers
from .supernet import SuperNet, copy_teacher


@dataclass
class Preset:
    train_limit: int | None
    train_len: int
    train_stride: int
    importance_batches: int
    supernet_epochs: float
    supernet_steps: int | None  # overrides epochs
    batch_size: int
    n_random: int
    search_dev: int  # dev questions for candidate F1 (the search slice)
    eval_dev: int  # further dev questions for the final F1 (disjoint from the search slice)
    calibration: int
    proposals: int
    phase2_inter: float  # epochs, or steps when phase2_steps
    phase2_pred: float
    phase2_steps: bool
    lr_supernet: float = 5e-5
    lr_phase2: float = 1e-4
    runs: int = 20  # timings per round
    rounds: int = 8  # rounds per measurement; the quietest (lowest median) is kept
    baselines: bool = True
    supernet_seconds: float | None = None  # time budgets (a GPU lease): the step count is fitted to them
    phase2_seconds: float | None = None  # per stage, the same for the chosen model and each baseline
    external: tuple[str, ...] = ("onnxruntime", "tflite")  # engines of the int8-teacher points on the plot
    hidden_fracs: tuple[float, ...] = (0.5, 0.75, 1.0)  # residual-stream widths searched (fractions of the teacher's)


PRESETS = {
    # minutes on 2 CPU cores: tiny training slices, the whole pipeline exercised
    # Minutes on 2 CPU cores. The supernet is not trained (0 steps): candidates are ranked by the F1 of
    # importance-ordered teacher slices, which keep most of the teacher's F1 at moderate pruning. Phase 2
    # gets a fixed time per stage (the chosen model and each baseline alike). About 12 minutes in all.
    # The hidden size stays the teacher's: an untrained slice of the residual stream loses most of
    # its F1 (teacher 78.9 -> 47.0 at 3/4 width, 15.5 at 1/2, on 60 dev questions), so without
    # supernet training those candidates cannot be ranked.
    "quick": Preset(train_limit=480, train_len=256, train_stride=96, importance_batches=4, supernet_epochs=0,
                    supernet_steps=0, batch_size=16, n_random=1, search_dev=32, eval_dev=120, calibration=6,
                    proposals=12, phase2_inter=400, phase2_pred=400, phase2_steps=True, lr_supernet=5e-5,
                    lr_phase2=1e-4, rounds=4, phase2_seconds=75, external=("onnxruntime",), hidden_fracs=(1.0,)),
    # the real run (hours on a CPU; CUDA is used when present)
    "full": Preset(train_limit=None, train_len=384, train_stride=128, importance_batches=16, supernet_epochs=3,
                   supernet_steps=None, batch_size=32, n_random=2, search_dev=500, eval_dev=2000, calibration=30,
                   proposals=100, phase2_inter=2, phase2_pred=3, phase2_steps=False, lr_supernet=1e-4,
                   lr_phase2=1e-4),
}


@dataclass
class Job:
    teacher: Path
    data: Path
    out: Path
    budget_ms: float | None
    threads: int = 1
    seq: int = 384
    preset: str = "quick"
    precisions: tuple[str, ...] = ("fp32",)
    controllers: tuple[str, ...] = ("rl", "evolution", "random")
    max_mb: float | None = None
    max_mem_mb: float | None = None
    latency_db: Path | None = None
    backend: str = "canao"
    measure: bool = True  # False: no target device here (GPU run); needs predictor_file
    predictor_file: Path | None = None
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    seq_choices: tuple[int, ...] | None = None  # maximum lengths the search may choose (each <= seq); None: seq only
    speedup: float | None = None  # instead of budget_ms: the teacher's measured fp32 p95 / speedup
    device: str | None = None  # time on this device (canao.device spec) instead of this machine


def _log(msg: str) -> None:
    print(f"[search] {msg}", file=sys.stderr, flush=True)


def data_files(data: Path) -> tuple[Path, Path]:
    data = Path(data)
    if data.is_file():
        return data, data
    train, dev = data / "squad" / "train-subset-v1.1.json", data / "squad" / "dev-v1.1.json"
    for p in (train, dev):
        if not p.exists():
            raise CanaoError(f"{p} not found: --data takes a folder laid out like ../shared/data (squad/...)")
    return train, dev


class State:
    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __contains__(self, k):
        return k in self.data

    def __getitem__(self, k):
        return self.data[k]

    def set(self, k, v):
        self.data[k] = v
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def run(job: Job, resume: bool = False, progress: bool = True) -> dict:
    t_start = time.perf_counter()
    out = Path(job.out)
    if (out / "state.json").exists() and not resume:
        raise CanaoError(f"{out} holds an earlier search; pass --resume to continue it or choose another --out")
    if resume and (out / "state.json").exists():  # a resumed run keeps the slices and sizes it started with
        started = json.loads((out / "state.json").read_text()).get("job", {})
        job = replace(job, preset=started.get("preset", job.preset),
                      precisions=tuple(started.get("precisions", job.precisions)),
                      overrides={**started.get("overrides", {}), **job.overrides})
    if job.preset not in PRESETS:
        raise CanaoError(f"unknown preset '{job.preset}'; choose quick or full")
    pre = replace(PRESETS[job.preset], **job.overrides)
    if (job.budget_ms is None) == (job.speedup is None):
        raise CanaoError("give the latency budget either as --budget-ms MS or as --speedup K (the teacher's "
                         "measured fp32 p95 divided by K), not both")
    if job.budget_ms is not None and job.budget_ms <= 0:
        raise CanaoError("--budget-ms must be positive")
    if job.speedup is not None and job.speedup < 1:
        raise CanaoError(f"--speedup {job.speedup}: must be at least 1 (the budget is the teacher's latency / K)")
    seqs = sorted(set(job.seq_choices or ()) | {job.seq})
    if seqs[0] < 80 or seqs[-1] != job.seq:
        raise CanaoError(f"--seq-choices {','.join(map(str, job.seq_choices or ()))}: each must be between 80 and "
                         f"--seq {job.seq} (a window holds the question and part of the context)")
    if job.speedup is not None and not job.measure:
        raise CanaoError("--speedup needs the target to measure the teacher on; give --budget-ms instead")
    out.mkdir(parents=True, exist_ok=True)
    st = State(out)
    prev = st.data.get("job")
    if prev:
        was = (prev.get("speedup"), None if prev.get("speedup") else prev["budget_ms"], prev["seq"], prev["threads"],
               prev.get("device"), prev.get("seq_choices", [prev["seq"]]))
        if was != (job.speedup, job.budget_ms, job.seq, job.threads, job.device, seqs):
            raise CanaoError(f"{out} was started with {_budget_words(prev)}, seq {prev['seq']}, {prev['threads']} "
                             f"thread(s), device {prev.get('device') or 'this machine'}; --resume needs the same settings")
        if job.speedup:
            job = replace(job, budget_ms=prev.get("budget_ms"))
    st.set("job", {"budget_ms": job.budget_ms, "speedup": job.speedup, "seq": job.seq, "seq_choices": seqs,
                   "threads": job.threads,
                   "device": job.device, "preset": job.preset, "precisions": list(job.precisions),
                   "teacher": str(job.teacher), "data": str(job.data), "overrides": job.overrides})
    # training and F1 evaluation use every core; --threads is the target's thread count, which the
    # oracle sets for each timing
    torch.set_num_threads(max(job.threads, os.cpu_count() or 1))
    train_file, dev_file = data_files(job.data)
    teacher_model, tok = load_encoder(job.teacher)
    tcfg = teacher_model.config
    bad = [p for p in job.precisions if p not in compiler_precisions()]
    if bad or not job.precisions:
        raise CanaoError(f"precision {', '.join(bad) or '(none)'} not available in the compiler; choose from "
                         f"{', '.join(compiler_precisions())}")
    space = SearchSpace.from_teacher(tcfg, seq=seqs, precisions=list(job.precisions),
                                     hidden_fracs=tuple(pre.hidden_fracs))
    dev = squad.read_squad(dev_file, pre.search_dev + pre.eval_dev)
    search_ex, eval_ex = dev[:pre.search_dev], dev[pre.search_dev:]
    if len(eval_ex) < 1:
        raise CanaoError(f"{dev_file}: only {len(dev)} dev questions; the search and eval slices need more")
    feats_by_seq: dict[int, squad.Features] = {}

    def eval_feats_at(seq: int) -> squad.Features:
        """The eval slice windowed for a model of this maximum length (shorter: more windows)."""
        if seq not in feats_by_seq:
            feats_by_seq[seq] = squad.make_features(tok, eval_ex, seq, eval_stride(seq))
        return feats_by_seq[seq]

    eval_feats = eval_feats_at(job.seq)

    def f1_of(run_fn, seq: int | None = None) -> float:
        return squad.score(run_fn, eval_ex, eval_feats_at(seq or job.seq))[0]["f1"]

    def torch_runner(model):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()

        @torch.no_grad()
        def run_fn(ids, tt, mask):
            s, e = model(*[torch.as_tensor(a, device=device) for a in (ids, tt, mask)])
            return s.float().cpu().numpy(), e.float().cpu().numpy()
        return run_fn

    oracle = None
    if job.measure:
        db = job.latency_db or Path(os.environ.get("CANAO_CACHE", Path.home() / ".cache" / "canao")) / "latency-db.json"
        oracle = LatencyOracle(tcfg, job.threads, job.backend, db, runs=pre.runs, rounds=pre.rounds, device=job.device,
                               progress=lambda a, m: _log(f"measured {a.key()}: p50 {m['median_ms']:.2f} ms, "
                                                          f"p95 {m['p95_ms']:.2f} ms"))
        # the teacher, compiled in fp32, is the reference point (and defines the budget with --speedup)
        if "teacher_latency" not in st:
            _log("measuring the teacher (canao fp32)")
            m = oracle.measure(space.largest(job.seq, "fp32"))
            st.set("teacher_latency", {"median_ms": m["median_ms"], "p95_ms": m["p95_ms"], "backend": job.backend})
        if job.budget_ms is None:
            job = replace(job, budget_ms=round(st["teacher_latency"]["p95_ms"] / job.speedup, 2))
            st.set("job", {**st["job"], "budget_ms": job.budget_ms})
            _log(f"budget: teacher p95 {st['teacher_latency']['p95_ms']:.2f} ms / {job.speedup} = {job.budget_ms} ms")
        # 1 reachable ---------------------------------------------------------
        if "reachable" not in st:
            _log(f"checking the budget against the smallest architecture ({job.backend} backend)")
            try:
                st.set("reachable", check_reachable(space, oracle, job.budget_ms, job.threads))
            except CanaoError:
                if set(st.data) <= {"job", "teacher", "teacher_latency"}:  # nothing worth resuming: leave no half-started folder
                    st.path.unlink(missing_ok=True)
                raise
    # 2 teacher -------------------------------------------------------------
    if "teacher" not in st:
        _log(f"teacher F1 on {len(eval_ex)} held-out dev questions")
        st.set("teacher", {"f1": f1_of(torch_runner(teacher_model)), "arch": space.largest().to_dict(),
                           "eval_questions": len(eval_ex)})

    # 3 calibration ---------------------------------------------------------
    predictor = LatencyPredictor(tcfg, threads=job.threads)
    if "calibration" in st:
        predictor = LatencyPredictor.from_dict(st["calibration"]["predictor"], tcfg)
    elif not job.measure:
        if not job.predictor_file:
            raise CanaoError("without measurement (measure=False) a fitted predictor file is needed")
        cal = json.loads(Path(job.predictor_file).read_text())
        predictor = LatencyPredictor.from_dict(cal["predictor"], tcfg)
        st.set("calibration", {**cal, "from": str(job.predictor_file)})
    else:
        archs = calibration_set(space, pre.calibration, job.seed)
        _log(f"calibrating the latency predictor on {len(archs)} compiled candidates ({pre.calibration} shapes x "
             f"{len(space.precisions)} precision(s))")
        samples = [(a, oracle.measure(a)) for a in archs]
        # every other measurement of this host/threads in the database helps too
        extra = [(a, m) for a, m in oracle.all_cached(job.threads) if a not in archs and space.contains(a)]
        samples += extra
        err = holdout_error(predictor, samples, seed=job.seed)
        st.set("calibration", {"predictor": predictor.to_dict(), "holdout": err, "measured": len(samples),
                               "backend": job.backend, "host": oracle.host})
        _log(f"predictor held-out error: {err['mape_pct']:.2f} % ({err['mae_ms']:.2f} ms) on {err['n']} candidates")
    (out / "predictor.json").write_text(json.dumps(st["calibration"], indent=1))

    # 4 supernet ------------------------------------------------------------
    sup_file = out / "supernet" / "model.safetensors"
    net_model = copy.deepcopy(teacher_model)
    train_feats = None

    def get_train_feats():
        nonlocal train_feats
        if train_feats is None:
            ex = squad.read_squad(train_file, pre.train_limit)
            train_feats = squad.make_features(tok, ex, pre.train_len, pre.train_stride, with_labels=True)
        return train_feats

    if "importance" not in st:
        _log("head/neuron importance on training windows")
        imp = compute_importance(net_model, get_train_feats(), batches=pre.importance_batches, batch_size=16)
        perms = reorder(net_model, imp)
        st.set("importance", {"perms": perms, "head_importance": [h.tolist() for h in imp["heads"]]})
    else:
        imp = {"heads": [None] * tcfg.num_layers, "ffn": [None] * tcfg.num_layers}
        _apply_perms(net_model, st["importance"]["perms"])
    teacher = copy_teacher(net_model)  # the reordered teacher: same function, head j <-> student head j
    net = SuperNet(net_model, space)
    if "supernet" not in st and pre.supernet_steps == 0:
        _log("phase 1 skipped (preset without supernet training): candidates are ranked by the F1 of "
             "importance-ordered teacher slices")
        st.set("supernet", {"steps": 0, "train_s": 0.0, "device": "none",
                            "note": "not trained: sub-networks are slices of the importance-ordered teacher"})
    if "supernet" not in st:
        feats = get_train_feats()
        steps = pre.supernet_steps or steps_for(pre.supernet_epochs, len(feats), pre.batch_size)
        dcfg = DistillConfig(steps=steps, batch_size=pre.batch_size, lr=pre.lr_supernet, n_random=pre.n_random,
                             seed=job.seed, save_every=max(10, steps // 20), time_budget_s=pre.supernet_seconds)
        _log(f"phase 1: supernet distillation, {steps} steps of {pre.batch_size} windows (sandwich: largest, smallest, "
             f"{pre.n_random} random)")
        res = train_supernet(net, teacher, feats, dcfg, out / "supernet-state", resume=resume, progress=progress)
        sup_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net_model.state_dict().items()}, str(sup_file))
        st.set("supernet", {**res, "config": asdict(dcfg), "train_windows": len(feats)})
    elif sup_file.exists():
        net_model.load_state_dict(load_file(str(sup_file)))
    elif st["supernet"].get("steps") == 0:
        pass  # the importance-ordered teacher is the supernet
    else:
        _log("supernet weights not here (trained elsewhere): a new phase 2 starts from teacher slices")
    net_model.to("cuda" if torch.cuda.is_available() else "cpu").eval()

    # 5 search --------------------------------------------------------------
    evaluator = Evaluator(net, tok, search_ex)
    scfg = SearchConfig(budget_ms=job.budget_ms, threads=job.threads, controllers=tuple(job.controllers),
                        proposals=pre.proposals, max_mb=job.max_mb, max_mem_mb=job.max_mem_mb, seed=job.seed)

    class _PredOnly:  # without a target device the search sees predictions only
        def cached(self, *a, **k):
            return None

    search = Search(space, tcfg, predictor, oracle or _PredOnly(), evaluator, scfg, out / "search-log.jsonl", progress)
    if "search" not in st:
        _log(f"search: {', '.join(scfg.controllers)}, {scfg.proposals} proposals each")
        anchors = [a for p in space.precisions
                   for a in baseline_shapes(space, predictor, job.budget_ms, job.seq, p).values()]
        summary = search.run(resume=resume, anchors=list(dict.fromkeys(anchors)))
        fixed = {k: evaluator.f1(a) for k, a in (("largest", space.largest()), ("smallest", space.smallest()))}
        st.set("search", {**summary, "subnet_f1": fixed, "search_questions": len(search_ex)})
    else:
        search.run(resume=True)  # replays the log: nothing re-evaluated
    ranked = search.ranked()
    if not ranked:
        raise CanaoError(f"no candidate met the {job.budget_ms} ms budget and the constraints; raise the budget "
                         f"(fastest measured: {st.data.get('reachable', {}).get('p95_ms', 'unknown')} ms p95)")

    # 6-8 confirm, phase 2, final (with fallback to the next candidate) --------------
    if not job.measure:
        chosen = ranked[0]
        _phase2(job, pre, st, net, teacher, tcfg, Arch.from_dict(chosen["arch"]), get_train_feats, out, resume,
                progress, tok, f1_of, torch_runner, save_half=True)
        if pre.baselines:
            _baselines(job, pre, st, space, tcfg, teacher, get_train_feats, out, resume, progress, f1_of, torch_runner, None,
                       predictor, chosen["arch"]["precision"])
        st.set("stopped", "measure=False: device stages left for a run on the target with --resume")
        return {"out": str(out), "chosen": chosen["key"], "state": st.data}
    tried = st.data.get("rejected", [])
    final = st.data.get("final")
    while final is None:
        candidates = [e for e in ranked if e["key"] not in tried]
        if not candidates:
            raise CanaoError(f"every candidate's compiled model exceeded the {job.budget_ms} ms budget when measured")
        arch, m, trail = search.confirm(candidates)
        st.set("confirm", trail)
        student = _phase2(job, pre, st, net, teacher, tcfg, arch, get_train_feats, out, resume, progress, tok, f1_of,
                          torch_runner)
        final = _final(job, pre, st, student, arch, out, oracle, eval_feats_at(arch.seq), eval_ex, f1_of)
        if final is None:
            tried.append(arch.key())
            st.set("rejected", tried)
            st.data.pop("phase2", None)

    # 9 baselines -----------------------------------------------------------
    if pre.baselines and "baselines" not in st:
        _baselines(job, pre, st, space, tcfg, teacher, get_train_feats, out, resume, progress, f1_of, torch_runner, oracle,
                   predictor, st["final"]["arch"]["precision"])
    # the teacher quantized to int8 on other engines: what a user would pick instead of searching
    if pre.external and "external_baselines" not in st:
        if job.device:
            st.set("external_baselines", {n: {"skipped": "the search timed a device; these engines run only here"}
                                          for n in pre.external})
        else:
            from .external import int8_teacher_points

            _log(f"the teacher in int8 on {', '.join(pre.external)}: F1 and latency")
            st.set("external_baselines", int8_teacher_points(teacher_model, eval_ex, eval_feats, job.seq, job.threads,
                                                             engines=pre.external, runs=pre.runs, log=_log))

    # 10 report -------------------------------------------------------------
    st.set("wall_s_last_run", time.perf_counter() - t_start)
    files = report.write_all(out, st.data, search.entries, job)
    fin = st["final"]
    return {
        "f1": fin["f1"], "median_ms": fin["median_ms"], "p95_ms": fin["p95_ms"], "budget_ms": job.budget_ms,
        "within_budget": fin["p95_ms"] <= job.budget_ms, "arch": fin["arch"], "seq": job.seq, "threads": job.threads,
        "per_question": fin.get("per_question"),
        "teacher": {"f1": st["teacher"]["f1"], **st["teacher_latency"]},
        "baselines": st.data.get("baselines", {}),
        "external_baselines": st.data.get("external_baselines", {}),
        "predictor": st["calibration"].get("holdout"),
        "controllers": st["search"]["controllers"],
        "eval_questions": len(eval_ex), "search_questions": len(search_ex),
        "paths": {"model": str(out / "model"), "artifact": str(out / "artifact"), **files},
        "wall_s": time.perf_counter() - t_start, "preset": job.preset,
    }


def _budget_words(job: dict) -> str:
    if job.get("speedup"):
        return f"--speedup {job['speedup']} (budget {job.get('budget_ms')} ms)"
    return f"budget {job['budget_ms']} ms"


def _apply_perms(model, perms) -> None:
    import numpy as np

    def scores(p):  # importance that sorts into exactly the recorded permutation
        p = np.asarray(p)
        score = np.empty(len(p))
        score[p] = -np.arange(len(p), dtype=float)
        return score

    fake = {kind: [scores(p) for p in perms[kind]] for kind in ("heads", "ffn")}
    if "hidden" in perms:  # searches started before hidden size was a dimension have none
        fake["hidden"] = scores(perms["hidden"])
    reorder(model, fake)


def _distill(pre: Preset, job: Job, student, teacher, arch: Arch, feats, state_root: Path, resume, progress,
             steps_of: dict[str, int] | None = None) -> tuple:
    """Phase 2 of one student: (student, {stage: steps taken}). `steps_of` fixes the step counts
    (the baselines get exactly the chosen model's); otherwise the preset's amounts, fitted to its
    time budget."""
    layer_map = keep_layers(arch.depth, teacher.config.num_layers)
    taken = {}
    for stage, amount in (("intermediate", pre.phase2_inter), ("prediction", pre.phase2_pred)):
        steps = int(amount) if pre.phase2_steps else steps_for(amount, len(feats), pre.batch_size)
        budget = pre.phase2_seconds
        if steps_of and stage in steps_of:
            steps, budget = steps_of[stage], None
        cfg = DistillConfig(steps=steps, batch_size=pre.batch_size, lr=pre.lr_phase2, seed=job.seed,
                            save_every=max(10, steps // 10), w_ce=0.5 if stage == "prediction" else 0.0,
                            time_budget_s=budget)
        done = state_root / f"{stage}.safetensors"
        if done.exists():  # finished stage
            student.load_state_dict(load_file(str(done)))
            taken[stage] = json.loads((state_root / f"{stage}.json").read_text())["steps"]
            continue
        r = distill_student(student, teacher, layer_map, feats, cfg, state_root / stage, stage, resume, progress)
        state_root.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(done))
        (state_root / f"{stage}.json").write_text(json.dumps(r))
        taken[stage] = r["steps"]
    return student, taken


def _phase2(job, pre, st, net, teacher, tcfg, arch, get_train_feats, out, resume, progress, tok, f1_of, torch_runner,
            save_half=False):
    model_dir = out / "model"
    same = "phase2" in st and Arch.from_dict(st["phase2"]["arch"]).shape_key() == arch.shape_key()
    if same and (model_dir / "config.json").exists():  # training does not depend on the precision
        student, _ = load_encoder(model_dir)
        return student
    _log(f"phase 2: distilling {arch.key()} (intermediate layers, then predictions)")
    t0 = time.perf_counter()
    student = net.extract(arch)  # starts from the supernet's weights
    state_root = out / f"phase2-{arch.shape_key()}"
    student, taken = _distill(pre, job, student, teacher, arch, get_train_feats(), state_root, resume, progress)
    student.eval()
    shutil.rmtree(model_dir, ignore_errors=True)
    if save_half:  # small enough to bring back from a GPU machine
        from ..models.checkpoint import save_checkpoint
        from ..models.wordpiece import tokenizer_files

        extra = tokenizer_files(job.teacher)
        save_checkpoint(model_dir, student.config.to_hf(student.architecture), student.state_dict(), extra,
                        dtype=torch.float16, max_shard_bytes=15 * 2**20)
    else:
        save_encoder(student, model_dir, job.teacher)
    st.set("phase2", {"key": arch.key(), "arch": arch.to_dict(), "train_s": time.perf_counter() - t0, "steps": taken,
                      "f1_torch": f1_of(torch_runner(student), arch.seq),
                      "device": "cuda" if torch.cuda.is_available() else "cpu"})
    shutil.rmtree(state_root, ignore_errors=True)
    return student


def _final(job, pre, st, student, arch, out, oracle, eval_feats, eval_ex, f1_of) -> dict | None:
    """Compile, verify, measure; None when the measured p95 misses the budget (twice)."""
    # Each candidate gets its own folder: a process keeps every shared library it has loaded, so
    # re-using one path for another model would run the old library. Only the accepted one is renamed.
    art = out / f"artifact-{arch.key()}"
    _log(f"compiling {arch.key()} and measuring it")
    summary = compile_final(student, art, arch, job.threads)
    timed = art  # what the target runs: this artifact, or one built for the device's target
    if oracle.device:
        timed = out / f"artifact-{arch.key()}-{oracle.target}"
        compile_final(student, timed, arch, job.threads, target=oracle.target)
    ver = verify_artifact(art, student, eval_feats, job.threads)
    if arch.precision != "fp32":  # bf16/int8 differ from PyTorch by design: checked by F1 below
        ver["ok"] = True
        ver["checked_by"] = "F1 of the compiled model against PyTorch's, at most 3 points lower"
    if not ver["ok"]:
        raise CanaoError(f"compiled model disagrees with PyTorch (max |diff| {ver['max_abs_diff']:.2e}); see {art}")
    m = oracle.time_artifact(timed, arch.seq)
    for _ in range(2):  # noise on a shared machine: measure afresh before rejecting, keep the best session
        if m["p95_ms"] <= job.budget_ms:
            break
        m = min(m, oracle.time_artifact(timed, arch.seq), key=lambda r: r["p95_ms"])
    if m["p95_ms"] > job.budget_ms:
        _log(f"{arch.key()} measured p95 {m['p95_ms']:.2f} ms > budget {job.budget_ms} ms: taking the next candidate")
        shutil.rmtree(art, ignore_errors=True)
        shutil.rmtree(timed, ignore_errors=True)
        return None
    from .latency import artifact_runner

    run_fn, close = artifact_runner(art, job.threads)
    try:
        f1 = f1_of(run_fn, arch.seq)
    finally:
        close()
    if f1 < st["phase2"]["f1_torch"] - 3.0:
        raise CanaoError(f"compiled {arch.precision} model loses {st['phase2']['f1_torch'] - f1:.1f} F1 against PyTorch; "
                         f"see {art}")
    # per-question timing needs the Python binding, so it is taken on this machine even with a device
    pq = {**per_question_latency(art, eval_feats, job.threads), "on": "this machine"}
    shutil.rmtree(out / "artifact", ignore_errors=True)
    shutil.rmtree(out / "artifact-host", ignore_errors=True)
    if timed != art:
        art.rename(out / "artifact-host")
        art = timed
    art.rename(out / "artifact")
    from ..models.wordpiece import tokenizer_files

    for folder in (out / "artifact", out / "artifact-host"):  # the apps tokenize before they run an artifact
        if folder.exists():
            for name, path in tokenizer_files(job.teacher).items():
                shutil.copyfile(path, folder / name)
    final = {"arch": arch.to_dict(), "key": arch.key(), "f1": f1, "median_ms": m["median_ms"], "p95_ms": m["p95_ms"],
             "runs": m["runs"], "verify": ver, "per_question": pq, "compile": {k: summary[k] for k in ("memory", "times")},
             "f1_torch": st["phase2"]["f1_torch"]}
    st.set("final", final)
    return final


def baseline_shapes(space: SearchSpace, predictor, budget_ms: float, seq: int, precision: str = "fp32") -> dict[str, Arch]:
    """Uniformly shrunk students sized to the budget by the predictor: the deepest full-width
    layer-dropped model, and the widest full-depth model (heads and FFN shrunk together)."""
    L, H, F = space.teacher_layers, space.teacher_heads, space.teacher_ffn
    depth = max([d for d in space.depths if predictor.predict(space.uniform(d, H, F, seq, precision)) <= budget_ms] or [1])
    widths = [(h, f) for h in space.head_choices for f in space.ffn_choices if abs(h / H - f / F) <= 0.13]
    fits = [(h, f) for h, f in widths if predictor.predict(space.uniform(L, h, f, seq, precision)) <= budget_ms]
    h, f = max(fits) if fits else min(widths)
    return {"layer-dropped": space.uniform(depth, H, F, seq, precision), "width-shrunk": space.uniform(L, h, f, seq, precision)}


def _baselines(job, pre, st, space, tcfg, teacher, get_train_feats, out, resume, progress, f1_of, torch_runner, oracle,
               predictor, precision):
    """Uniformly shrunk students from teacher slices with the same phase-2 distillation, in the chosen
    model's precision (quantization is free for everyone): F1 anywhere, latency only where the
    oracle (the target) is."""
    shapes = baseline_shapes(space, predictor, job.budget_ms, job.seq, precision)
    results = st.data.get("baseline_partial", {})
    for name, arch in shapes.items():
        r = results.get(name)
        if r is None:
            _log(f"baseline {name} {arch.key()}: same phase-2 distillation")
            sliced = SuperNet(copy.deepcopy(teacher).cpu(), space).extract(arch)  # teacher slices, not the supernet
            root = out / f"baseline-{name}-state"
            # the same distillation as the chosen model: its step counts, not a time budget of their own
            sliced, _ = _distill(pre, job, sliced, teacher, arch, get_train_feats(), root, resume, progress,
                                 st.data.get("phase2", {}).get("steps"))
            r = {"arch": arch.to_dict(), "key": arch.key(), "f1": f1_of(torch_runner(sliced))}
            sliced.cpu()
            results[name] = r
            st.set("baseline_partial", results)
            shutil.rmtree(root, ignore_errors=True)
        if oracle is not None and "p95_ms" not in r:
            m = oracle.measure(arch)
            r.update(median_ms=m["median_ms"], p95_ms=m["p95_ms"])
            st.set("baseline_partial", results)
    if oracle is not None:
        st.set("baselines", results)
