"""`canao distill`: distil a trained student further from the teacher's cached outputs.

A search's phase 2 is short on 2 CPU cores (minutes: a fraction of one pass over the augmented
data), and the baselines get the same steps, so the comparison inside a search is fair. A
user who wants the most accurate model of one architecture (a shipped student, a search's
result) can give it more time here, without searching again:

    canao distill --student minilm-squad-8x --teacher T --data D --out runs/more-8x --minutes 60

or train one architecture from the start, from slices of the importance-ordered teacher, as a
search's baselines do (with --supernet, the order that supernet was trained in):

    canao distill --arch L6-h2-f384-int8 --supernet S --shared-embeddings minilm --teacher T --data D --out O

Same loss and data as phase 2 (KL to the cached teacher logits on the augmented train subset +
hard-label CE on the original questions; distill.py), warm-up and decay over the new schedule,
F1 on the search's selection slice (dev questions 300..800: disjoint from the reported held-out
figures) every `eval_every` steps, and the best weights, the starting ones included, are kept:
the result is never worse on that slice than the student it started from. Checkpointed: an
interrupted run continues with --resume; a finished one is refused rather than overwritten.

OUT/model     the student (the same layout as the input; a shared word-embedding table stays shared)
OUT/distill.json  where it started, the schedule, every evaluation, the best step, the command
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import CanaoError
from ..fileio import atomic_write_text, run_lock
from .space import Arch

# the search's slices of the dev file (pipeline.PRESETS["standard"]): 300 search, then 500 selection
SELECT_FROM, SELECT_N = 300, 500


@dataclass
class FurtherJob:
    student: str | None  # a folder or a shipped student's name; None: start from teacher slices of `arch`
    teacher: Path
    data: Path
    out: Path
    minutes: float | None = 30.0
    steps: int | None = None  # without minutes: exactly these
    lr: float = 1e-4
    eval_every: int = 200
    data_preset: str = "standard"  # the supernet preset whose augmented data and cached logits are used
    data_overrides: dict = field(default_factory=dict)  # of that preset's data settings (tests: a tiny slice)
    select_n: int = SELECT_N
    seed: int = 0
    threads: int | None = None
    arch: str | None = None  # Arch.parse text: start from the importance-ordered teacher's slices
    supernet: Path | None = None  # with arch: take the importance order from this supernet (else compute it)
    shared_embeddings: str | None = None  # with arch: refer to this built-in model's word-embedding table
    repair_windows: int = 128  # with arch: refit the slices' output projections on this many windows (0: as cut)
    command: list[str] = field(default_factory=list)


def _log(msg: str) -> None:
    print(f"[distill] {msg}", file=sys.stderr, flush=True)


def run(job: FurtherJob, resume: bool = False, progress: bool = True) -> dict:
    from ..models.checkpoint import read_config
    from ..models.encoders import SHARED_TABLE, load_encoder, save_encoder
    from ..paths import resolve_model_path
    from ..tasks import squad
    from ..train.finetune import clear_state
    from .distill import DistillConfig, check_windows, distill_student
    from .pipeline import DevSets, data_files, torch_runner
    from .supernet_train import SupernetJob, preset_of, training_windows

    if job.minutes is None and job.steps is None:
        raise CanaoError("give --minutes or --steps")
    if job.minutes is not None and not job.minutes > 0:
        raise CanaoError(f"--minutes must be > 0, got {job.minutes}")
    if job.steps is not None and job.steps < 1:
        raise CanaoError(f"--steps must be >= 1, got {job.steps}")
    out = Path(job.out)
    record_path = out / "distill.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record and not resume:
        raise CanaoError(f"{out} holds an earlier run; pass --resume to continue it or choose another --out")
    if record.get("finished"):
        raise CanaoError(f"{out}: this run has finished (best F1 {record['best']['f1']:.2f} at step "
                         f"{record['best']['step']}); its model is {out / 'model'}. Choose another --out for more")
    if job.repair_windows < 0:
        raise CanaoError(f"--repair-windows must be >= 0 (0: no refit), got {job.repair_windows}")
    if (job.student is None) == (job.arch is None):
        raise CanaoError("give a trained student (--student) or an architecture to start from teacher slices (--arch)")
    if job.student is not None and (job.supernet or job.shared_embeddings):
        raise CanaoError("--supernet and --shared-embeddings go with --arch: a --student keeps its own")
    arch = Arch.parse(job.arch) if job.arch else None
    source = resolve_model_path(job.student) if job.student else None
    origin = str(source) if source else f"teacher slices {arch.key()}"
    if record.get("source", origin) != origin:
        raise CanaoError(f"{out} was started from {record['source']}, not {origin}; --resume needs the same student")
    torch.set_num_threads(job.threads or os.cpu_count() or 1)
    teacher, tok = load_encoder(job.teacher, task="qa")
    if arch is not None:
        _check_fits(arch, teacher.config)
    if source is not None:
        raw = read_config(source)
        student, stok = load_encoder(source, task="qa")
        student = student.float()
        if stok.get_vocab() != tok.get_vocab():
            raise CanaoError(f"{source} and the teacher {job.teacher} use different vocabularies; the cached teacher "
                             "outputs are per token, so the student must share the teacher's tokenizer")
        shared = raw.get(SHARED_TABLE)
        shared = {k: shared[k] for k in ("model", "channels")} if shared else None
    with run_lock(out, "distill"):  # one run per folder: a second --resume is refused, not interleaved
        if record_path.exists():  # as the lock's holder left it
            record = json.loads(record_path.read_text())
        spre = preset_of(job.data_preset, job.data_overrides)
        sjob = SupernetJob(job.teacher, job.data, out, preset=job.data_preset, seed=job.seed)
        windows = training_windows(sjob, spre, teacher, tok, threads=job.threads, progress=progress)
        check_windows(windows)
        if arch is not None:
            if not record.get("importance"):  # decided once: a resumed run slices the same channels
                record["importance"] = _importance(job, teacher, windows, spre)
                atomic_write_text(record_path, json.dumps(record, indent=1))
            student, shared, repair = _teacher_slices(job, teacher, arch, record["importance"], windows)
            if repair is not None and "repair" not in record:
                record["repair"] = repair
                atomic_write_text(record_path, json.dumps(record, indent=1))
        del teacher

        _, dev_file = data_files(job.data)
        dev = squad.read_squad(dev_file)
        if len(dev) < SELECT_FROM + job.select_n:
            raise CanaoError(f"{dev_file}: {len(dev)} dev questions; the selection slice needs {SELECT_FROM + job.select_n}")
        sets = DevSets(tok, {"select": dev[SELECT_FROM:SELECT_FROM + job.select_n]})
        seq = min(384, student.config.max_position_embeddings)
        select = lambda: sets.f1(torch_runner(student), "select", seq)  # noqa: E731

        cfg = DistillConfig(steps=job.steps or 10**6, batch_size=spre.batch_size, lr=job.lr, seed=job.seed,
                            save_every=50, eval_every=job.eval_every,
                            time_budget_s=job.minutes * 60 if job.minutes is not None else None)
        if "source" not in record:
            record = {**record, "source": origin, "arch": arch.key() if arch else None, "teacher": str(job.teacher),
                      "data": str(job.data), "data_key": windows.meta.get("key"), "train_windows": len(windows), "config": asdict(cfg),
                      "select_questions": [SELECT_FROM, SELECT_FROM + job.select_n], "command": job.command,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            atomic_write_text(record_path, json.dumps(record, indent=1))
        _log(f"distilling {origin} on {len(windows)} cached windows"
             + (f" for {job.minutes:g} minutes" if job.minutes else f" for {job.steps} steps")
             + f"; F1 on dev questions {SELECT_FROM}..{SELECT_FROM + job.select_n} every {job.eval_every} steps")
        t0 = time.perf_counter()
        res = distill_student(student, windows, cfg, out / "state", resume=resume, progress=progress, evaluate=select)
        model_dir = out / "model"
        save_encoder(student, model_dir, job.teacher, shared_table=shared)
        record.update(finished=True, steps=res["steps"], train_s=record.get("train_s", 0) + time.perf_counter() - t0,
                      start_f1=res["evals"][0]["f1"], best=res["best"], evals=res["evals"], bf16=res["bf16"],
                      device=res["device"], model=str(model_dir))
        atomic_write_text(record_path, json.dumps(record, indent=1))
        clear_state(out / "state")  # only once the model and the record are written
        _log(f"selection-slice F1 {record['start_f1']:.2f} -> {res['best']['f1']:.2f} (step {res['best']['step']} of "
             f"{res['steps']}); model in {model_dir}")
        return {"out": str(out), "model": str(model_dir), "start_f1": record["start_f1"], "best": res["best"],
                "steps": res["steps"], "train_s": record["train_s"]}


def _importance(job: FurtherJob, teacher, windows, spre) -> dict:
    """The teacher's head / FFN-neuron / hidden-channel order: a supernet's (checked to be this teacher's),
    or computed on original training windows as `canao supernet train` does."""
    from .augment import teacher_digest
    from .supernet_train import importance_order

    if job.supernet is not None:
        path = Path(job.supernet) / "supernet.json"
        if not path.exists():
            raise CanaoError(f"{job.supernet}: not a supernet folder (no supernet.json)")
        meta = json.loads(path.read_text())
        if meta.get("teacher_digest") != teacher_digest(job.teacher):
            raise CanaoError(f"{job.supernet} belongs to another teacher than {job.teacher}")
        return {"from": str(job.supernet), "perms": meta["importance"]["perms"]}
    import copy

    _log("head/neuron/channel importance on original training windows")
    perms = importance_order(copy.deepcopy(teacher), windows, spre.importance_batches, job.seed)
    return {"from": "computed", "perms": perms}


def _check_fits(arch, cfg) -> None:
    if (arch.depth > len(cfg.layer_heads) or max(arch.heads) > min(cfg.layer_heads)
            or max(arch.ffn) > min(cfg.layer_ffn) or (arch.hidden or 0) > cfg.hidden_size):
        raise CanaoError(f"{arch.key()} is larger than the teacher ({len(cfg.layer_heads)} layers, {min(cfg.layer_heads)} "
                         f"heads, FFN {min(cfg.layer_ffn)}, hidden {cfg.hidden_size}): a student is a slice of it")


def _teacher_slices(job: FurtherJob, teacher, arch, importance: dict, windows):
    """(student, shared-table spec, refit record or None): `arch`'s slices of the importance-ordered teacher,
    their output projections refit by least squares on `job.repair_windows` training windows (reconstruct.py)."""
    import copy

    from .pipeline import _apply_perms
    from .space import SearchSpace
    from .supernet import SuperNet
    from .supernet_train import swap_word_table

    cfg = teacher.config
    H = arch.hidden or cfg.hidden_size
    sliced = copy.deepcopy(teacher)
    perms = importance["perms"]
    _apply_perms(sliced, perms)
    hidden_perm = perms.get("hidden") or list(range(cfg.hidden_size))
    shared = None
    if job.shared_embeddings:
        swap_word_table(sliced, job.shared_embeddings, hidden_perm)
        shared = {"model": job.shared_embeddings, "channels": list(hidden_perm[:H])}
    space = SearchSpace.from_teacher(cfg, seq=arch.seq)
    student = SuperNet(sliced.eval(), space).extract(arch).float()
    repair = None
    if job.repair_windows:
        from .reconstruct import Reconstructor, calibration_windows

        repair = Reconstructor(sliced, calibration_windows(windows, job.repair_windows, job.seed))(student, arch)
    return student, shared, repair


def register_distill(sub) -> None:
    import argparse

    from ..cli import add_common

    p = sub.add_parser("distill", help="distil a trained student (a shipped one, a search's) further from the "
                                       "cached teacher", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--student", help="student folder, or a shipped student's name (minilm-squad-8x)")
    start.add_argument("--arch", help="start from the importance-ordered teacher's slices of this architecture "
                                      "(a report's key, or e.g. L6-h2-f384: one value for every layer)")
    p.add_argument("--supernet", default=None, help="with --arch: the importance order of this supernet folder "
                                                    "(default: computed on the training data)")
    p.add_argument("--shared-embeddings", default=None, metavar="MODEL",
                   help="with --arch: refer to this built-in model's word-embedding table (e.g. minilm) instead "
                        "of storing one")
    p.add_argument("--repair-windows", type=int, default=128, metavar="N",
                   help="with --arch: refit the slices' output projections by least squares on N training windows "
                        "before distilling (seconds; 0: start from the slices as cut)")
    p.add_argument("--teacher", required=True, help="the teacher checkpoint folder it was distilled from")
    p.add_argument("--data", required=True, help="data folder laid out like ../shared/data")
    p.add_argument("--out", required=True, help="output folder (model/, distill.json)")
    p.add_argument("--minutes", type=float, default=None, help="training time (fits the schedule to it; default 30)")
    p.add_argument("--steps", type=int, default=None, help="training steps (instead of --minutes)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, then linear decay)")
    p.add_argument("--eval-every", type=int, default=200, help="selection-slice F1 every this many steps")
    p.add_argument("--data-preset", choices=["quick", "standard", "full"], default="standard",
                   help="whose augmented data and cached teacher logits (the supernet presets': standard = the "
                        "train subset with ten augmented copies of each question)")
    p.add_argument("--select-questions", type=int, default=SELECT_N, help="size of the selection slice")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> dict:
    minutes = args.minutes if args.minutes is not None or args.steps is not None else 30.0
    job = FurtherJob(student=args.student, arch=args.arch, supernet=Path(args.supernet) if args.supernet else None,
                     shared_embeddings=args.shared_embeddings, repair_windows=args.repair_windows,
                     teacher=Path(args.teacher), data=Path(args.data), out=Path(args.out),
                     minutes=minutes, steps=args.steps, lr=args.lr, eval_every=args.eval_every,
                     data_preset=args.data_preset, select_n=args.select_questions, seed=args.seed,
                     threads=args.threads, command=["canao", *sys.argv[1:]])
    res = run(job, resume=args.resume, progress=not args.json)
    if not args.json:
        print(f"F1 on the selection slice {res['start_f1']:.2f} -> {res['best']['f1']:.2f}; model: {res['model']}")
    return res
