"""`canao search` end to end, as resumable stages recorded in OUT/state.json.

 1 reachable      measure the smallest architecture: an impossible budget stops here
 2 teacher        F1 on the dev questions the report uses (the whole dev file in standard/full)
 3 calibration    measure candidates through the compiler, fit the latency predictor, held-out error
 4 data           augmented questions + the teacher's cached logits (shared with every search)
 5 supernet       --supernet DIR, or trained into OUT/supernet by the preset (canao supernet train),
                  or none (quick: slices of the importance-ordered teacher); every teacher slice is
                  refit by least squares on calibration windows when extracted (reconstruct.py)
 6 search         controllers (RL, evolution, random) over the space, every candidate's sub-network
                  F1 on the search slice (>= 300 dev questions), every candidate logged
 7 confirm        measure the best candidates in order of F1: the first 3 % under the budget is taken
 8 phase2         the chosen architecture from the better of its supernet weights and its (refit)
                  teacher slice, distilled from the cached teacher; the best checkpoint by F1 on the
                  selection slice (>= 500 dev questions, disjoint from the search slice) is kept
 9 final          compile, verify against PyTorch, measure p50/p95 (padded and per question),
                  F1 of the compiled model; over budget -> the next confirmed candidate
10 baselines      width-shrunk and layer-dropped students from (refit) teacher slices with the same phase-2
                  steps on the same cached data (one identical to CANAO's model is not trained
                  twice; quick: width-shrunk only), and the teacher in int8 where that fits the budget,
                  each compiled and measured; the int8 teacher on other engines (Pareto points)
11 returned       the model with the best selection-slice F1 among CANAO and the in-budget baselines:
                  the search never returns a model below its own starting point or a baseline
12 report         search log, Pareto PNG, report.md, result.json

`SearchRun` runs them, one method per stage. A finished stage is never redone with --resume;
training stages resume from their last checkpoint. `measure=False` runs the stages that need no target device (for a GPU machine)
using a predictor file; a later run with measure=True and resume finishes the device stages.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import CanaoError
from ..models.encoders import load_encoder, save_encoder
from ..tasks import squad
from . import report
from ..train.finetune import clear_state
from .distill import DistillConfig, distill_student
from .importance import reorder
from .oracle import (LatencyOracle, artifact_runner, compile_final, compiler_precisions, per_question_latency,
                     verify_artifact)
from .predictor import LatencyPredictor, calibration_set, holdout_error
from .search import Evaluator, Search, SearchConfig, check_reachable, eval_stride
from .space import Arch, SearchSpace
from .supernet import SuperNet, copy_teacher
from .supernet_train import _plain


@dataclass
class Preset:
    supernet: str | None  # supernet preset trained into OUT/supernet when --supernet is not given; None: none
    data: str  # supernet preset whose data settings (questions, augmentation, windows) phase 2 uses
    search_dev: int  # dev questions for candidate F1 (the search slice)
    select_dev: int  # further dev questions: phase 2 keeps its best checkpoint on them (PyTorch, every eval_every steps)
    eval_dev: int | None  # dev questions of the reported F1 (None: the whole dev file)
    calibration: int
    proposals: int
    phase2_steps: int
    phase2_seconds: float | None = None  # fits the chosen model's steps to this; the baselines get the same steps
    eval_every: int = 0  # phase 2: F1 on the selection slice every this many steps (0: at its end only)
    batch_size: int = 32
    lr_phase2: float = 1e-4
    runs: int = 20  # timings per round
    rounds: int = 8  # rounds per measurement; the quietest (lowest median) is kept
    # uniformly shrunk students trained like CANAO's model (the safety net and the comparison);
    # the int8 teacher is measured too wherever int8 is searched
    baselines: tuple[str, ...] = ("width-shrunk", "layer-dropped")
    # further dev questions after the selection slice: the returned model is chosen among the compiled
    # finals on selection + these (500 questions ranked a 2x search's models ~2 F1 off their whole-file order)
    choose_dev: int = 0
    latency_guard: float = 0.03  # confirm a candidate only this fraction under the budget, so the final timing holds
    external: tuple[str, ...] = ("onnxruntime", "tflite")  # engines of the int8-teacher points on the plot
    hidden_fracs: tuple[float, ...] = (0.5, 0.75, 1.0)  # residual-stream widths searched (fractions of the teacher's)
    min_depth: int = 2
    # calibration windows for the least-squares refit of teacher slices (reconstruct.py); 0: slices as cut
    repair_windows: int = 128


PRESETS = {
    # The README's main job: 15 minutes on 2 CPU cores. No supernet: candidates are ranked by the F1 of
    # importance-ordered teacher slices, each refit by least squares (seconds each); phase 2 distills on
    # 1,000 training questions and two augmented copies of each, at learning rate 3e-4 (its ~150 steps
    # from a refit L6-h4-f384 reached selection F1 59.2, against 58.0 at 1e-4 and 57.8 at 6e-4). The
    # hidden size stays the teacher's (untrained narrow slices of the residual stream cannot be ranked).
    # One baseline, the width-shrunk student (the layer-dropped one never came near at 2x-4x), and no
    # other engines: each costs another phase 2 or minutes of evaluation.
    "quick": Preset(supernet=None, data="quick", search_dev=300, select_dev=500, eval_dev=1000, calibration=6,
                    proposals=8, phase2_steps=2000, phase2_seconds=150, eval_every=0, rounds=4, lr_phase2=3e-4,
                    baselines=("width-shrunk",), external=(), hidden_fracs=(1.0,)),
    # About 2 hours on 2 CPU cores: the standard supernet (45 min, reused by later searches of the same
    # teacher), a search ranked by its sub-networks, 25 minutes of phase 2 (what F1 needs most: a 4x
    # student gained 3.8 F1 in its first 140 steps), then the baselines with the same steps.
    "standard": Preset(supernet="standard", data="standard", search_dev=300, select_dev=500, choose_dev=1000, eval_dev=None,
                       calibration=20, proposals=15, phase2_steps=20000, phase2_seconds=25 * 60, eval_every=200,
                       rounds=4, external=("onnxruntime",), hidden_fracs=(1.0,)),
    # A GPU for the training stages (scripts/device_search.sh), then the device stages on the target.
    "full": Preset(supernet="full", data="full", search_dev=500, select_dev=500, choose_dev=1000, eval_dev=None, calibration=30,
                   proposals=40, phase2_steps=6000, eval_every=500, batch_size=64),
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
    supernet: Path | None = None  # a trained supernet (canao supernet train) to search in
    shared_embeddings: str | None = None  # students refer to this built-in model's word-embedding table
    supernet_overrides: dict = field(default_factory=dict)  # for a supernet trained by the preset (tests)


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
        from ..fileio import atomic_write_text

        self.data[k] = v
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def _check_job(job: Job) -> tuple[Job, Preset, list[int]]:
    if job.preset not in PRESETS:
        raise CanaoError(f"unknown preset '{job.preset}'; choose {', '.join(PRESETS)}")
    pre = replace(PRESETS[job.preset], **job.overrides)
    if isinstance(pre.baselines, bool):  # searches started before baselines were named
        pre = replace(pre, baselines=PRESETS["standard"].baselines if pre.baselines else ())
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
    if job.supernet is not None and not (Path(job.supernet) / "supernet.json").exists():
        raise CanaoError(f"--supernet {job.supernet}: not a supernet folder (no supernet.json); make one with "
                         "`canao supernet train`")
    return job, pre, seqs


def run(job: Job, resume: bool = False, progress: bool = True) -> dict:
    out = Path(job.out)
    if (out / "state.json").exists() and not resume:
        raise CanaoError(f"{out} holds an earlier search; pass --resume to continue it or choose another --out")
    from ..fileio import run_lock

    with run_lock(out, "search"):  # one search per folder: a second --resume is refused, not interleaved
        return SearchRun(job, resume, progress).run()


class SearchRun:
    """One `canao search`: each stage a method that records its result in OUT/state.json and, once
    recorded, is not redone (training stages resume from their own checkpoints)."""

    def __init__(self, job: Job, resume: bool, progress: bool):
        self.t_start = time.perf_counter()
        self.out, self.resume, self.progress = Path(job.out), resume, progress
        if resume and (self.out / "state.json").exists():  # a resumed run keeps the slices and sizes it started with
            started = json.loads((self.out / "state.json").read_text()).get("job", {})
            job = replace(job, preset=started.get("preset", job.preset),
                          precisions=tuple(started.get("precisions", job.precisions)),
                          overrides={**started.get("overrides", {}), **job.overrides},
                          supernet=Path(started["supernet"]) if started.get("supernet") else job.supernet,
                          shared_embeddings=started.get("shared_embeddings", job.shared_embeddings))
        self.job, self.pre, self.seqs = _check_job(job)
        self.out.mkdir(parents=True, exist_ok=True)
        self.st = State(self.out)
        self.oracle: LatencyOracle | None = None

    def run(self) -> dict:
        self.record_job()
        self.load()
        if self.job.measure:
            self.measure_teacher()  # 1 reachable
        self.score_teacher()  # 2
        self.calibrate()  # 3
        self.prepare_students()  # 4-5 data and supernet
        ranked = self.rank()  # 6
        if not self.job.measure:
            return self.train_only(ranked[0])
        self.train_chosen(ranked)  # 7-9 confirm, phase 2, final
        self.train_baselines()  # 10
        self.time_other_engines()
        if "returned" not in self.st:  # 11 never below the starting point or an in-budget baseline
            self.st.set("returned", self.choose_returned())
        return self.report()  # 12

    # ------------------------------------------------------------------ settings and inputs
    def record_job(self) -> None:
        job, st = self.job, self.st
        prev = st.data.get("job")
        if prev:
            was = (prev.get("speedup"), None if prev.get("speedup") else prev["budget_ms"], prev["seq"], prev["threads"],
                   prev.get("device"), prev.get("seq_choices", [prev["seq"]]))
            if was != (job.speedup, job.budget_ms, job.seq, job.threads, job.device, self.seqs):
                raise CanaoError(f"{self.out} was started with {_budget_words(prev)}, seq {prev['seq']}, {prev['threads']} "
                                 f"thread(s), device {prev.get('device') or 'this machine'}; --resume needs the same settings")
            if job.speedup:
                self.job = job = replace(job, budget_ms=prev.get("budget_ms"))
        st.set("job", {"budget_ms": job.budget_ms, "speedup": job.speedup, "seq": job.seq, "seq_choices": self.seqs,
                       "threads": job.threads, "device": job.device, "preset": job.preset,
                       "precisions": list(job.precisions), "teacher": str(job.teacher), "data": str(job.data),
                       "overrides": job.overrides, "supernet_overrides": _plain(job.supernet_overrides),
                       "supernet": str(job.supernet) if job.supernet else None,
                       "shared_embeddings": job.shared_embeddings})

    def load(self) -> None:
        """The teacher, the search space and the dev slices."""
        job, pre = self.job, self.pre
        # training and F1 evaluation use every core; --threads is the target's thread count, which the
        # oracle sets for each timing
        torch.set_num_threads(max(job.threads, os.cpu_count() or 1))
        _, self.dev_file = data_files(job.data)
        self.teacher, self.tok = load_encoder(job.teacher)
        tcfg = self.teacher.config
        bad = [p for p in job.precisions if p not in compiler_precisions()]
        if bad or not job.precisions:
            raise CanaoError(f"precision {', '.join(bad) or '(none)'} not available in the compiler; choose from "
                             f"{', '.join(compiler_precisions())}")
        self.space = SearchSpace.from_teacher(tcfg, seq=self.seqs, precisions=list(job.precisions),
                                              min_depth=pre.min_depth, hidden_fracs=tuple(pre.hidden_fracs))
        dev = squad.read_squad(self.dev_file)
        n_sel = pre.search_dev + pre.select_dev + pre.choose_dev
        eval_ex = dev if pre.eval_dev is None else dev[:pre.eval_dev]
        if len(eval_ex) <= n_sel:
            raise CanaoError(f"{self.dev_file}: {len(eval_ex)} dev questions to report on; the search, selection and "
                             f"choice slices need more than {n_sel}")
        self.search_ex = dev[:pre.search_dev]
        # the choice slice holds the selection slice: scored from the eval predictions, which cover both
        self.sets = DevSets(self.tok, {"select": dev[pre.search_dev:pre.search_dev + pre.select_dev],
                                       "choose": dev[pre.search_dev:n_sel], "eval": eval_ex,
                                       "heldout": dev[n_sel:len(eval_ex)]})

    # ------------------------------------------------------------------ 1 the teacher's latency, the budget
    def measure_teacher(self) -> None:
        job, pre, st = self.job, self.pre, self.st
        db = job.latency_db or Path(os.environ.get("CANAO_CACHE", Path.home() / ".cache" / "canao")) / "latency-db.json"
        self.oracle = LatencyOracle(self.teacher.config, job.threads, job.backend, db, runs=pre.runs, rounds=pre.rounds,
                                    device=job.device,
                                    progress=lambda a, m: _log(f"measured {a.key()}: p50 {m['median_ms']:.2f} ms, "
                                                               f"p95 {m['p95_ms']:.2f} ms"))
        # the teacher, compiled in fp32, is the reference point (and defines the budget with --speedup)
        if "teacher_latency" not in st:
            _log("measuring the teacher (canao fp32)")
            m = self.oracle.measure(self.space.largest(job.seq, "fp32"))
            st.set("teacher_latency", {"median_ms": m["median_ms"], "p95_ms": m["p95_ms"], "backend": job.backend})
        if job.budget_ms is None:
            self.job = job = replace(job, budget_ms=round(st["teacher_latency"]["p95_ms"] / job.speedup, 2))
            st.set("job", {**st["job"], "budget_ms": job.budget_ms})
            _log(f"budget: teacher p95 {st['teacher_latency']['p95_ms']:.2f} ms / {job.speedup} = {job.budget_ms} ms")
        if "reachable" not in st:
            _log(f"checking the budget against the smallest architecture ({job.backend} backend)")
            try:
                st.set("reachable", check_reachable(self.space, self.oracle, job.budget_ms, job.threads))
            except CanaoError:
                if set(st.data) <= {"job", "teacher", "teacher_latency"}:  # nothing worth resuming: leave no half-started folder
                    st.path.unlink(missing_ok=True)
                raise

    # ------------------------------------------------------------------ 2 the teacher's F1
    def score_teacher(self) -> None:
        if "teacher" not in self.st:
            n_eval = len(self.sets.slices["eval"])
            self.st.set("teacher", {**teacher_scores(self.job, self.teacher, self.sets, self.dev_file, n_eval),
                                    "arch": self.space.largest().to_dict(), "eval_questions": n_eval})

    # ------------------------------------------------------------------ 3 the latency predictor
    def calibrate(self) -> None:
        job, pre, st = self.job, self.pre, self.st
        tcfg = self.teacher.config
        self.predictor = LatencyPredictor(tcfg, threads=job.threads)
        if "calibration" in st:
            self.predictor = LatencyPredictor.from_dict(st["calibration"]["predictor"], tcfg)
        elif not job.measure:
            if not job.predictor_file:
                raise CanaoError("without measurement (measure=False) a fitted predictor file is needed")
            cal = json.loads(Path(job.predictor_file).read_text())
            self.predictor = LatencyPredictor.from_dict(cal["predictor"], tcfg)
            st.set("calibration", {**cal, "from": str(job.predictor_file)})
        else:
            archs = calibration_set(self.space, pre.calibration, job.seed)
            _log(f"calibrating the latency predictor on {len(archs)} compiled candidates ({pre.calibration} shapes x "
                 f"{len(self.space.precisions)} precision(s))")
            samples = [(a, self.oracle.measure(a)) for a in archs]
            # every other measurement of this host/threads in the database helps too
            samples += [(a, m) for a, m in self.oracle.all_cached(job.threads)
                        if a not in archs and self.space.contains(a)]
            err = holdout_error(self.predictor, samples, seed=job.seed)
            st.set("calibration", {"predictor": self.predictor.to_dict(), "holdout": err, "measured": len(samples),
                                   "backend": job.backend, "host": self.oracle.host})
            _log(f"predictor held-out error: {err['mape_pct']:.2f} % ({err['mae_ms']:.2f} ms) on {err['n']} candidates")
        (self.out / "predictor.json").write_text(json.dumps(st["calibration"], indent=1))

    # ------------------------------------------------------------------ 4-5 data and supernet
    def prepare_students(self) -> None:
        """The distillation windows (augmented, teacher-labelled), the supernet to search in (trained by
        the preset, given, or the importance-ordered teacher's slices) and the teacher-slice start."""
        from . import supernet_train

        job, pre, st, tcfg = self.job, self.pre, self.st, self.teacher.config
        sup_dir = Path(job.supernet) if job.supernet else (self.out / "supernet" if pre.supernet else None)
        sjob = supernet_train.SupernetJob(job.teacher, job.data, sup_dir or self.out / "supernet",
                                          preset=pre.supernet or pre.data, overrides=job.supernet_overrides,
                                          shared_embeddings=job.shared_embeddings, seed=job.seed)
        if job.supernet:  # a trained supernet brings its data settings and its shared table
            smeta = json.loads((Path(job.supernet) / "supernet.json").read_text())
            sjob = replace(sjob, preset=smeta["preset"], overrides=smeta.get("overrides", {}),
                           shared_embeddings=smeta.get("shared_embeddings"), seed=smeta.get("seed", 0))
            if job.shared_embeddings not in (None, sjob.shared_embeddings):
                raise CanaoError(f"--supernet {job.supernet} was trained with shared embeddings "
                                 f"{sjob.shared_embeddings}, not {job.shared_embeddings}")
            self.job = job = replace(job, shared_embeddings=sjob.shared_embeddings)
            st.set("job", {**st["job"], "shared_embeddings": job.shared_embeddings})
        if sup_dir is not None and job.supernet is None and "supernet" not in st:
            _log(f"phase 1: training the supernet ({sjob.preset} preset) into {sup_dir}")
            supernet_train.train(sjob, resume=True, progress=self.progress)
        spre = supernet_train.preset_of(sjob.preset, sjob.overrides)
        self.windows = supernet_train.training_windows(sjob, spre, self.teacher, self.tok, progress=self.progress)
        # the importance-ordered teacher: the supernet's channel order, or its own for the quick preset
        sliced = copy.deepcopy(self.teacher)
        if sup_dir is not None:
            trained, smeta = supernet_train.load(sup_dir, job.teacher)
            perms = smeta["importance"]["perms"]
            _apply_perms(sliced, perms)
            self.space = replace(self.space, depths=trained.space.depths, head_choices=trained.space.head_choices,
                                 ffn_choices=trained.space.ffn_choices,
                                 hidden_choices=trained.space.hidden_choices if len(pre.hidden_fracs) > 1
                                 else [tcfg.hidden_size])
            st.set("supernet", {"folder": str(sup_dir), "training": {k: smeta["training"].get(k) for k in
                                                                     ("steps", "train_s", "device", "bf16")},
                                "data": smeta.get("data"), "reference": smeta.get("reference")})
        else:
            if "importance" not in st:
                import numpy as np

                from .importance import compute_importance

                _log("head/neuron importance on original training windows")
                orig = np.flatnonzero(self.windows.original)[:spre.importance_batches * 16]
                imp = compute_importance(sliced, self.windows.features(orig), batches=spre.importance_batches,
                                         batch_size=16)
                st.set("importance", {"perms": reorder(sliced, imp)})
            else:
                _apply_perms(sliced, st["importance"]["perms"])
            perms = st["importance"]["perms"]
            st.set("supernet", {"steps": 0, "note": "not trained: sub-networks are slices of the importance-ordered teacher"})
        if job.shared_embeddings:
            supernet_train.swap_word_table(sliced, job.shared_embeddings, perms.get("hidden"))
        self.slices = SuperNet(copy_teacher(sliced), self.space)
        if pre.repair_windows:  # every teacher-slice student (ranked, started from, baseline) is refit first
            from .reconstruct import Reconstructor, RepairedSlices, calibration_windows

            calib = calibration_windows(self.windows, pre.repair_windows, job.seed)
            self.slices = RepairedSlices(self.slices, Reconstructor(self.slices.model, calib))
        self.net = SuperNet(trained.model, self.space) if sup_dir is not None else self.slices
        self.net.model.eval()
        self.hidden_perm = perms.get("hidden") or list(range(tcfg.hidden_size))

    # ------------------------------------------------------------------ 6 the search
    def rank(self) -> list[dict]:
        job, pre, st = self.job, self.pre, self.st
        evaluator = Evaluator(self.net, self.tok, self.search_ex)
        scfg = SearchConfig(budget_ms=job.budget_ms, threads=job.threads, controllers=tuple(job.controllers),
                            proposals=pre.proposals, max_mb=job.max_mb, max_mem_mb=job.max_mem_mb, seed=job.seed)

        class _PredOnly:  # without a target device the search sees predictions only
            def cached(self, *a, **k):
                return None

        self.search = Search(self.space, self.teacher.config, self.predictor, self.oracle or _PredOnly(), evaluator, scfg,
                             self.out / "search-log.jsonl", self.progress)
        if "search" not in st:
            _log(f"search: {', '.join(scfg.controllers)}, {scfg.proposals} proposals each, F1 on "
                 f"{len(self.search_ex)} dev questions")
            anchors = [a for p in self.space.precisions for a in self._baseline_shapes(p, ("width-shrunk", "layer-dropped")).values()]
            summary = self.search.run(resume=self.resume, anchors=list(dict.fromkeys(anchors)))
            fixed = {k: evaluator.f1(a) for k, a in (("largest", self.space.largest()), ("smallest", self.space.smallest()))}
            st.set("search", {**summary, "subnet_f1": fixed, "search_questions": len(self.search_ex)})
        else:
            self.search.run(resume=True)  # replays the log: nothing re-evaluated
        ranked = self.search.ranked()
        if not ranked:
            raise CanaoError(f"no candidate met the {job.budget_ms} ms budget and the constraints; raise the budget "
                             f"(fastest measured: {st.data.get('reachable', {}).get('p95_ms', 'unknown')} ms p95)")
        return ranked

    def _baseline_shapes(self, precision: str, names) -> dict[str, Arch]:
        return baseline_shapes(self.space, self.predictor, self.job.budget_ms, self.job.seq, precision, names)

    def train_only(self, chosen: dict) -> dict:
        """measure=False (a GPU machine): the training stages only, the device stages left for --resume."""
        self.train(Arch.from_dict(chosen["arch"]), self.out / "model")
        for name, arch in self._baseline_shapes(chosen["arch"]["precision"], self.pre.baselines).items():
            self.baseline(name, arch)
        self.st.set("stopped", "measure=False: device stages left for a run on the target with --resume")
        return {"out": str(self.out), "chosen": chosen["key"], "state": self.st.data}

    # ------------------------------------------------------------------ 7-9 confirm, phase 2, final
    def train_chosen(self, ranked: list[dict]) -> None:
        """The best confirmed candidate trained and compiled; over budget when measured -> the next one."""
        st = self.st
        tried = st.data.get("rejected", [])
        final = st.data.get("final")
        while final is None:
            candidates = [e for e in ranked if e["key"] not in tried]
            if not candidates:
                raise CanaoError(f"every candidate's compiled model was rejected: over the {self.job.budget_ms} ms budget "
                                 "when measured, or its compiled F1 more than 3 below PyTorch's (see the search log)")
            # a rejected shrunk-to-fit candidate is not in `ranked`: excluded so it is not proposed again
            arch, m, trail = self.search.confirm(candidates, guard=self.pre.latency_guard, exclude=tried)
            if arch.key() in tried:  # cannot happen with `exclude`; never train a rejected model twice
                raise CanaoError(f"{arch.key()} was confirmed again after its trained model measured over the budget")
            st.set("confirm", trail)
            student = self.train(arch, self.out / "model")
            final = self.final(student, arch, self.out / f"artifact-{arch.key()}", "phase2")
            if final is None:
                tried.append(arch.key())
                st.set("rejected", tried)
                st.data.pop("phase2", None)
            else:
                st.set("final", final)

    def _config(self, steps: int, budget: float | None) -> DistillConfig:
        pre = self.pre
        return DistillConfig(steps=steps, batch_size=pre.batch_size, lr=pre.lr_phase2, seed=self.job.seed,
                             save_every=max(10, min(200, steps // 10)), eval_every=pre.eval_every,
                             time_budget_s=budget)

    def _distill(self, arch: Arch, init, state_dir: Path, steps: int, budget: float | None) -> tuple:
        student = init
        select = lambda: self.sets.f1(torch_runner(student), "select", arch.seq)  # noqa: E731
        res = distill_student(student, self.windows, self._config(steps, budget), state_dir, self.resume,
                              self.progress, evaluate=select)
        return student, res

    def _save(self, student, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        shared = None
        if self.job.shared_embeddings:
            H = student.config.hidden_size
            shared = {"model": self.job.shared_embeddings, "channels": list(self.hidden_perm[:H])}
        save_encoder(student, folder, self.job.teacher, shared_table=shared)

    def train(self, arch: Arch, model_dir: Path):
        st = self.st
        same = "phase2" in st and Arch.from_dict(st["phase2"]["arch"]).shape_key() == arch.shape_key()
        if same and (model_dir / "config.json").exists():  # training does not depend on the precision
            student, _ = load_encoder(model_dir)
            return student
        t0 = time.perf_counter()
        # start from whichever is better on the selection slice: the supernet's weights or the teacher's slices
        starts = {"supernet": self.net.extract(arch)} if self.net is not self.slices else {}
        starts["teacher-slices"] = self.slices.extract(arch)
        start_f1 = {k: self.sets.f1(torch_runner(m), "select", arch.seq) for k, m in starts.items()}
        start = max(start_f1, key=start_f1.get)
        _log(f"phase 2: distilling {arch.key()} from its {start} weights (selection-slice F1 "
             + ", ".join(f"{k} {v:.2f}" for k, v in start_f1.items()) + ")")
        state_root = self.out / f"phase2-{arch.shape_key()}"
        student, res = self._distill(arch, starts[start], state_root, self.pre.phase2_steps, self.pre.phase2_seconds)
        self._save(student, model_dir)
        st.set("phase2", {"key": arch.key(), "arch": arch.to_dict(), "train_s": time.perf_counter() - t0,
                          "steps": res["steps"], "start": start, "start_f1": start_f1,
                          "repair": self._repair_record(arch), "best": res["best"], "evals": res["evals"], "f1_select_torch": res["best"]["f1"], "device": res["device"],
                          "bf16": res["bf16"], "train_windows": len(self.windows)})
        clear_state(state_root)  # only once the model and its record are saved: before, a crash resumes at the end
        return student

    def final(self, student, arch: Arch, art: Path, stage: str) -> dict | None:
        """Compile, verify, measure, F1: None (phase 2) when the measured p95 misses the budget (twice) or the
        compiled model's F1 is more than 3 below PyTorch's on the selection slice."""
        job, oracle = self.job, self.oracle
        # Each candidate gets its own folder: a process keeps every shared library it has loaded, so
        # re-using one path for another model would run the old library. Only the accepted one is renamed.
        _log(f"compiling {arch.key()} and measuring it")
        summary = compile_final(student, art, arch, job.threads)
        timed = art  # what the target runs: this artifact, or one built for the device's target
        if oracle.device:
            timed = art.with_name(art.name + f"-{oracle.target}")
            compile_final(student, timed, arch, job.threads, target=oracle.target)
        ver = verify_artifact(art, student, self.sets.features("select", arch.seq), job.threads)
        if arch.precision != "fp32":  # bf16/int8 differ from PyTorch by design: checked by F1 below
            ver["ok"] = True
            ver["checked_by"] = "F1 of the compiled model against PyTorch's on the selection slice, at most 3 points lower"
        if not ver["ok"]:
            raise CanaoError(f"compiled model disagrees with PyTorch (max |diff| {ver['max_abs_diff']:.2e}); see {art}")
        m = oracle.time_artifact(timed, arch.seq)
        for _ in range(2):  # noise on a shared machine: measure afresh before rejecting, keep the best session
            if m["p95_ms"] <= job.budget_ms:
                break
            m = min(m, oracle.time_artifact(timed, arch.seq), key=lambda r: r["p95_ms"])

        def rejected(why: str) -> None:  # phase 2 takes the next confirmed candidate
            _log(f"{arch.key()} {why}: taking the next candidate")
            shutil.rmtree(art, ignore_errors=True)
            shutil.rmtree(timed, ignore_errors=True)

        if m["p95_ms"] > job.budget_ms and stage == "phase2":
            return rejected(f"measured p95 {m['p95_ms']:.2f} ms > budget {job.budget_ms} ms")
        run_fn, close = artifact_runner(art, job.threads)
        try:
            f1_select = self.sets.f1(run_fn, "select", arch.seq)
            scores = self.sets.scores(run_fn, arch.seq)
        finally:
            close()
        torch_f1 = self.sets.f1(torch_runner(student), "select", arch.seq)
        if f1_select < torch_f1 - 3.0:
            loss = f"compiled {arch.precision} model loses {torch_f1 - f1_select:.1f} F1 against PyTorch"
            if stage == "phase2":  # as a model over the budget: the next confirmed candidate, not a dead search
                return rejected(loss)
            raise CanaoError(f"{loss}; see {art}")
        # per-question timing needs the Python binding, so it is taken on this machine even with a device
        pq = {**per_question_latency(art, self.sets.features("eval", arch.seq), job.threads), "on": "this machine"}
        return {"arch": arch.to_dict(), "key": arch.key(), **scores, "f1_select": f1_select, "f1_select_torch": torch_f1,
                "median_ms": m["median_ms"], "p95_ms": m["p95_ms"], "runs": m["runs"], "verify": ver,
                "per_question": pq, "compile": {k: summary[k] for k in ("memory", "times")},
                "artifact": str(art), "timed_artifact": str(timed), "within_budget": m["p95_ms"] <= job.budget_ms}

    def baseline(self, name: str, arch: Arch) -> None:
        """A uniformly shrunk student from teacher slices, with the chosen model's phase-2 steps."""
        st = self.st
        results = st.data.get("baseline_partial", {})
        if name in results:
            done = results[name]
            if self.oracle is not None and "p95_ms" not in done and "same_as" not in done:
                # trained without the target (measure=False): compiled, measured and scored here
                student, _ = load_encoder(done["model"])
                done.update(self.final(student, arch, Path(done["model"]).parent / f"artifact-{arch.key()}", "baseline"))
                st.set("baseline_partial", results)
            return
        steps = st.data.get("phase2", {}).get("steps", self.pre.phase2_steps)
        fin = st.data.get("final")
        if fin and fin["key"] == arch.key() and self._teacher_slice_start():
            # CANAO chose this very shape and started it from teacher slices: the baseline would repeat its
            # training step for step (same start, data, seed and steps), so its results are CANAO's
            _log(f"baseline {name} {arch.key()}: the architecture and start of CANAO's model; not trained twice")
            results[name] = {**fin, "steps": st["phase2"]["steps"], "best": st["phase2"]["best"],
                             "model": str(self.out / "model"), "same_as": "canao"}
            st.set("baseline_partial", results)
            return
        _log(f"baseline {name} {arch.key()}: teacher slices, the same phase-2 steps and data")
        student, res = self._distill(arch, self.slices.extract(arch), self.out / f"baseline-{name}-state", steps, None)
        folder = self.out / f"baseline-{name}"
        self._save(student, folder / "model")
        r = {"arch": arch.to_dict(), "key": arch.key(), "steps": res["steps"], "best": res["best"], "model": str(folder / "model"),
             "repair": self._repair_record(arch)}
        if self.oracle is not None:
            r.update(self.final(student, arch, folder / f"artifact-{arch.key()}", "baseline") or {})
        else:
            r.update(self.sets.scores(torch_runner(student), arch.seq), f1_select=res["best"]["f1"])
        results[name] = r
        st.set("baseline_partial", results)
        clear_state(self.out / f"baseline-{name}-state")

    def _teacher_slice_start(self) -> bool:
        """Did CANAO's phase 2 start from the teacher's slices (as a baseline does)?"""
        p2 = self.st.data.get("phase2", {})
        # (a quick search recorded before the refit called its teacher-slice start "supernet")
        return p2.get("start") == "teacher-slices" or (self.net is self.slices and p2.get("start") == "supernet")

    def _repair_record(self, arch: Arch) -> dict | None:
        """The least-squares refit of `arch`'s teacher slices (reconstruct.py), if there was one."""
        return getattr(self.slices, "records", {}).get(arch.shape_key())

    def int8_teacher(self, arch: Arch) -> None:
        """The teacher compiled by canao in int8: a baseline wherever it fits the budget."""
        st = self.st
        results = st.data.get("baseline_partial", {})
        if "teacher-int8" in results:
            return
        m = self.oracle.measure(arch)
        if m["p95_ms"] > self.job.budget_ms:
            results["teacher-int8"] = {"arch": arch.to_dict(), "key": arch.key(), "median_ms": m["median_ms"],
                                       "p95_ms": m["p95_ms"], "within_budget": False,
                                       "note": "over budget (random-weight measurement); F1 not taken"}
        else:
            _log("the teacher in canao int8 fits the budget: F1 and latency")
            folder = self.out / "baseline-teacher-int8"
            save_encoder(self.teacher, folder / "model", self.job.teacher)
            results["teacher-int8"] = {"model": str(folder / "model"),
                                       **self.final(self.teacher, arch, folder / f"artifact-{arch.key()}", "baseline")}
        st.set("baseline_partial", results)

    # ------------------------------------------------------------------ 11 the returned model
    def choose_returned(self) -> dict:
        """CANAO's model unless an in-budget baseline scores higher on the selection slice; the chosen
        model and artifact end up in OUT/model and OUT/artifact."""
        st, out = self.st, self.out
        fin = st["final"]
        # a baseline of CANAO's own architecture compiles to the same code: a noisier timing of it
        # (a busy machine) does not put it over the budget
        fits = lambda b: b.get("within_budget") or (b.get("key") == fin["key"] and fin["within_budget"])  # noqa: E731
        pool = {"canao": fin} | {k: b for k, b in st.data.get("baselines", {}).items()
                                 if fits(b) and "f1_select" in b}
        # the larger choice slice where every final has it (searches started before it: the selection slice)
        by = "f1_choose" if all("f1_choose" in b for b in pool.values()) else "f1_select"
        name = max(pool, key=lambda k: (pool[k][by], k == "canao"))
        chosen = pool[name]
        for folder in ("artifact", "artifact-host"):
            shutil.rmtree(out / folder, ignore_errors=True)
        art, timed = Path(chosen["artifact"]), Path(chosen["timed_artifact"])
        if timed != art:
            shutil.copytree(art, out / "artifact-host")
        shutil.copytree(timed, out / "artifact")
        if name != "canao":
            shutil.rmtree(out / "model", ignore_errors=True)
            shutil.copytree(chosen["model"], out / "model")
        from ..compiler.artifact import add_files
        from ..models.wordpiece import tokenizer_files

        for folder in (out / "artifact", out / "artifact-host"):  # the apps tokenize before they run an artifact
            if folder.exists():
                add_files(folder, tokenizer_files(self.job.teacher))
        slice_words = (f"the {chosen.get('choose_questions')} choice questions" if by == "f1_choose"
                       else "the selection slice")
        why = (f"CANAO's model has the best F1 on {slice_words}" if name == "canao" else
               f"the {name} baseline scored higher on {slice_words} ({chosen[by]:.2f} vs {fin[by]:.2f}) and fits "
               "the budget, so it is returned instead")
        return {"name": name, "key": chosen["key"], "f1_select": chosen["f1_select"], "by": by, by: chosen[by],
                "why": why}

    # ------------------------------------------------------------------ 10 baselines
    def train_baselines(self) -> None:
        st, job = self.st, self.job
        if "baselines" not in st:
            for name, arch in self._measured_baselines(st["final"]["arch"]["precision"]).items():
                self.baseline(name, arch)
            if "int8" in job.precisions and self.pre.baselines:
                self.int8_teacher(self.space.largest(job.seq, "int8"))
            st.set("baselines", st.data.get("baseline_partial", {}))

    def _measured_baselines(self, precision: str, tries: int = 3) -> dict[str, Arch]:
        """Each baseline's shape: the largest of its kind whose measured p95 is within the budget (the
        predictor's choice can miss it by a few %, and a baseline over the budget is trained for nothing),
        trying at most `tries` shapes; a baseline recorded earlier keeps its shape."""
        done = self.st.data.get("baseline_partial", {})
        shapes = {}
        for name, cands in baseline_candidates(self.space, self.predictor, self.job.budget_ms, self.job.seq, precision,
                                               self.pre.baselines).items():
            if name in done:
                shapes[name] = Arch.from_dict(done[name]["arch"])
                continue
            shapes[name] = first_within(cands, self.oracle.measure, self.job.budget_ms, tries, self.pre.latency_guard)
        return shapes

    def time_other_engines(self) -> None:
        """The teacher quantized to int8 on other engines: what a user would pick instead of searching."""
        job, pre, st = self.job, self.pre, self.st
        if not pre.external or "external_baselines" in st:
            return
        if job.device:
            st.set("external_baselines", {n: {"skipped": "the search timed a device; these engines run only here"}
                                          for n in pre.external})
            return
        from .external import int8_teacher_points

        eval_ex = self.sets.slices["eval"]
        _log(f"the teacher in int8 on {', '.join(pre.external)}: F1 on {len(eval_ex)} dev questions and latency")
        st.set("external_baselines", int8_teacher_points(self.teacher, eval_ex, self.sets.features("eval", job.seq),
                                                         job.seq, job.threads, engines=pre.external, runs=pre.runs,
                                                         log=_log))

    # ------------------------------------------------------------------ 12 report
    def report(self) -> dict:
        job, st, out = self.job, self.st, self.out
        st.set("wall_s_last_run", time.perf_counter() - self.t_start)
        files = report.write_all(out, st.data, self.search.entries, job)
        fin, ret = st["final"], st["returned"]
        chosen = fin if ret["name"] == "canao" else st["baselines"][ret["name"]]
        return {
            "f1": chosen["f1"], "median_ms": chosen["median_ms"], "p95_ms": chosen["p95_ms"], "budget_ms": job.budget_ms,
            "within_budget": chosen["p95_ms"] <= job.budget_ms, "arch": chosen["arch"], "seq": job.seq,
            "threads": job.threads, "returned": ret, "f1_heldout": chosen.get("f1_heldout"),
            "per_question": chosen.get("per_question"), "canao": fin,
            "teacher": {"f1": st["teacher"]["f1"], **st["teacher_latency"]},
            "baselines": st.data.get("baselines", {}),
            "external_baselines": st.data.get("external_baselines", {}),
            "predictor": st["calibration"].get("holdout"),
            "controllers": st["search"]["controllers"],
            "eval_questions": len(self.sets.slices["eval"]), "search_questions": len(self.search_ex),
            "select_questions": len(self.sets.slices["select"]),
            "paths": {"model": str(out / "model"), "artifact": str(out / "artifact"), **files},
            "wall_s": time.perf_counter() - self.t_start, "preset": job.preset,
        }


def teacher_scores(job: Job, teacher, sets: "DevSets", dev_file: Path, n_eval: int) -> dict:
    """The teacher's F1 on the eval questions, computed once per teacher, dev file and slice (a later
    search of the same teacher reads it back: minutes on a CPU for the whole dev file)."""
    from ..fileio import atomic_write_text, file_digest
    from ..paths import cache_root
    from .augment import teacher_digest

    tdig = teacher_digest(job.teacher)
    key = f"{file_digest(dev_file)[:16]}|{n_eval}|{len(sets.slices['heldout'])}|{job.seq}|{eval_stride(job.seq)}"
    path = cache_root() / "distill" / tdig / "teacher-scores.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        _log(f"teacher F1 on {n_eval} dev questions")
        known[key] = sets.scores(torch_runner(teacher), job.seq)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known, indent=1))
    return known[key]


def torch_runner(model):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    @torch.no_grad()
    def run_fn(ids, tt, mask):
        s, e = model(*[torch.as_tensor(a, device=device) for a in (ids, tt, mask)])
        return s.float().cpu().numpy(), e.float().cpu().numpy()
    return run_fn


class DevSets:
    """The dev slices a search scores on ("select", "choose", "eval", "heldout"), windowed per maximum length once."""

    def __init__(self, tok, slices: dict[str, list]):
        self.tok, self.slices = tok, slices
        self._feats: dict[tuple[str, int], squad.Features] = {}

    def features(self, name: str, seq: int) -> squad.Features:
        if (name, seq) not in self._feats:
            self._feats[(name, seq)] = squad.make_features(self.tok, self.slices[name], seq, eval_stride(seq))
        return self._feats[(name, seq)]

    def f1(self, run_fn, name: str, seq: int) -> float:
        return squad.score(run_fn, self.slices[name], self.features(name, seq))[0]["f1"]

    def scores(self, run_fn, seq: int) -> dict:
        """F1 on the eval questions, and on the held-out part of them (not used for any choice)."""
        metrics, preds = squad.score(run_fn, self.slices["eval"], self.features("eval", seq))
        held = self.slices["heldout"]
        res = {"f1": metrics["f1"], "em": metrics["em"],
               "f1_choose": squad.squad_metrics(self.slices["choose"], preds)["f1"],
               "choose_questions": len(self.slices["choose"])}
        if held:
            res["f1_heldout"] = squad.squad_metrics(held, preds)["f1"]
            res["heldout_questions"] = len(held)
        return res


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


def baseline_candidates(space: SearchSpace, predictor, budget_ms: float, seq: int, precision: str = "fp32",
                        names=("width-shrunk", "layer-dropped")) -> dict[str, list[Arch]]:
    """Uniformly shrunk students, largest first, from the largest the predictor fits in the budget down:
    full-width layer-dropped models (fewer layers), and full-depth width-shrunk models (heads and FFN
    shrunk together); those in `names`. Where none is predicted to fit, the smallest alone."""
    L, H, F = space.teacher_layers, space.teacher_heads, space.teacher_ffn
    fits = lambda a: predictor.predict(a) <= budget_ms  # noqa: E731
    dropped = [space.uniform(d, H, F, seq, precision) for d in sorted(space.depths, reverse=True)]
    widths = sorted(((h, f) for h in space.head_choices for f in space.ffn_choices if abs(h / H - f / F) <= 0.13),
                    reverse=True)
    shrunk = [space.uniform(L, h, f, seq, precision) for h, f in widths]
    shapes = {"width-shrunk": [a for a in shrunk if fits(a)] or shrunk[-1:],
              "layer-dropped": [a for a in dropped if fits(a)] or dropped[-1:]}
    return {n: shapes[n] for n in names}


def baseline_shapes(space: SearchSpace, predictor, budget_ms: float, seq: int, precision: str = "fp32",
                    names=("width-shrunk", "layer-dropped")) -> dict[str, Arch]:
    """The largest of each kind of uniformly shrunk student that the predictor fits in the budget."""
    return {n: c[0] for n, c in baseline_candidates(space, predictor, budget_ms, seq, precision, names).items()}


def first_within(cands: list[Arch], measure, budget_ms: float, tries: int = 3, guard: float = 0.0) -> Arch:
    """The first of `cands` (at most `tries` measured) whose measured p95 is `guard` (a fraction) under the
    budget, as confirm takes CANAO's; else the first within the budget itself; else the first of all
    (its report row then says over budget)."""
    within = None
    for arch in cands[:tries]:
        p95 = measure(arch)["p95_ms"]  # the oracle's cache answers for shapes confirm measured
        if p95 <= budget_ms * (1 - guard):
            return arch
        if p95 <= budget_ms and within is None:
            within = arch
    return within or cands[0]
