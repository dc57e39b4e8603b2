"""`canao supernet train`: one weight-sharing supernet per teacher, reused by every search.

    train(SupernetJob(teacher, data, out, preset="standard"))   # resumable; OUT/supernet.json says what it is
    net, meta = load(OUT, teacher_dir)                           # what `canao search --supernet OUT` starts from

Stages, each recorded in OUT/supernet.json and skipped once done:
 1 data        augmented questions + the teacher's cached logits (training_data.prepare), shared
               by every stage and every later search of this teacher
 2 importance  head / FFN-neuron / hidden-channel importance on original windows; the teacher is
               reordered (same function) so "the first k" are the best k
 3 training    phase 1: sandwich rule with progressive shrinking (distill.train_supernet),
               checkpointed; the step count is fitted to the preset's time budget
 4 reference   F1 of a few sub-networks (largest, uniform halves, smallest) on a dev slice

The weights are saved as OUT/model.safetensors (float32, the teacher's shape, reordered) with
the search space, the permutations and the cache key in supernet.json. With a shared
word-embedding table (`shared_embeddings="minilm"`), the supernet's table is that model's
(reordered like the teacher's channels) so that students can refer to it instead of storing it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import CanaoError
from ..fileio import atomic_save_tensors, atomic_write_text
from ..models.encoders import WORD_TABLE, load_encoder, shared_word_table
from ..tasks import squad
from .augment import AugmentRecipe, teacher_digest
from ..train.finetune import clear_state
from .distill import DistillConfig, train_supernet
from .importance import compute_importance, reorder
from .space import SearchSpace
from .supernet import SuperNet
from .teacher_cache import WindowSettings
from .training_data import prepare


@dataclass
class SupernetPreset:
    train_limit: int | None = None  # training questions (None: all)
    copies: int = 10  # augmented copies per question (0: none)
    window: WindowSettings = field(default_factory=WindowSettings)
    importance_batches: int = 16
    steps: int = 20000  # the schedule; `seconds` shortens it to what fits
    seconds: float | None = 75 * 60
    batch_size: int = 32
    lr: float = 1e-4
    n_random: int = 2
    largest_every: int = 4
    flops_range: tuple[float, float] = (0.04, 0.6)
    shrink: tuple[float, ...] = (0.1, 0.35)
    min_depth: int = 2
    hidden_fracs: tuple[float, ...] = (0.5, 0.75, 1.0)
    reference_dev: int = 300
    save_every: int = 50  # steps between checkpoints


SUPERNET_PRESETS = {
    # 2 CPU cores: 45 minutes of training after the one-time data preparation. The hidden size stays the
    # teacher's: slicing the residual stream as well costs the full-width sub-networks more than 2 CPU
    # hours of training give back.
    "standard": SupernetPreset(seconds=45 * 60, hidden_fracs=(1.0,), shrink=(0.1,), flops_range=(0.1, 0.6)),
    # a GPU: every window of the augmented set several times over, every sub-network every step
    "full": SupernetPreset(steps=30000, seconds=None, batch_size=64, n_random=3, largest_every=1, lr=2e-4),
    # minutes: a slice of the data, a few hundred steps (a smoke run of the whole path)
    "quick": SupernetPreset(train_limit=1000, copies=2, importance_batches=4, steps=300, seconds=4 * 60,
                            reference_dev=100),
}


@dataclass
class SupernetJob:
    teacher: Path
    data: Path
    out: Path
    preset: str = "standard"
    overrides: dict = field(default_factory=dict)
    shared_embeddings: str | None = None  # a built-in model whose word-embedding table students refer to
    seed: int = 0
    engine: str = "canao"  # what computes the teacher's cached logits (canao: the compiled fp32 teacher)
    threads: int | None = None  # training threads (None: every core)


def _log(msg: str) -> None:
    print(f"[supernet] {msg}", file=sys.stderr, flush=True)


def preset_of(name: str, overrides: dict) -> SupernetPreset:
    if name not in SUPERNET_PRESETS:
        raise CanaoError(f"unknown supernet preset '{name}'; choose {', '.join(SUPERNET_PRESETS)}")
    if isinstance(overrides.get("window"), dict):  # as supernet.json stores it
        overrides = {**overrides, "window": WindowSettings(**overrides["window"])}
    return replace(SUPERNET_PRESETS[name], **overrides)


def _plain(overrides: dict) -> dict:
    return {k: asdict(v) if isinstance(v, WindowSettings) else v for k, v in overrides.items()}


def training_windows(job: SupernetJob, pre: SupernetPreset, teacher, tok, threads: int | None = None,
                     progress: bool = True):
    from .pipeline import data_files

    train_file, _ = data_files(job.data)
    recipe = AugmentRecipe(copies=pre.copies, seed=job.seed) if pre.copies else None
    return prepare(teacher, tok, job.teacher, train_file, recipe, pre.window, pre.train_limit, job.engine,
                   threads=threads, progress=progress, log=_log)


def swap_word_table(model, shared: str, hidden_perm: list[int] | None) -> None:
    """Give `model` (teacher-shaped, reordered by `hidden_perm`) the word-embedding table of `shared`."""
    H = model.config.hidden_size
    channels = hidden_perm if hidden_perm is not None else list(range(H))
    table = shared_word_table({"model": shared, "channels": channels})
    if table.shape != model.bert.embeddings.word_embeddings.weight.shape:
        raise CanaoError(f"'{shared}' has a {tuple(table.shape)} word-embedding table; the teacher's is "
                         f"{tuple(model.bert.embeddings.word_embeddings.weight.shape)}")
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.copy_(table)


def train(job: SupernetJob, resume: bool = False, progress: bool = True) -> dict:
    out = Path(job.out)
    if (out / "supernet.json").exists() and not resume:
        raise CanaoError(f"{out} holds a supernet; pass --resume to continue or reuse it, or choose another --out")
    from ..fileio import run_lock

    with run_lock(out, "supernet training"):
        return _train(job, resume, progress)


def _train(job: SupernetJob, resume: bool, progress: bool) -> dict:
    t_start = time.perf_counter()
    out = Path(job.out)
    meta_path = out / "supernet.json"
    pre = preset_of(job.preset, job.overrides)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    tdig = teacher_digest(job.teacher)
    if meta and meta.get("teacher_digest") != tdig:
        raise CanaoError(f"{out} was trained from another teacher (digest {meta.get('teacher_digest')}, this one {tdig})")
    out.mkdir(parents=True, exist_ok=True)

    def save_meta(**kw):
        meta.update(kw)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))

    if not meta:
        save_meta(teacher=str(job.teacher), teacher_digest=tdig, preset=job.preset, overrides=_plain(job.overrides),
                  shared_embeddings=job.shared_embeddings, seed=job.seed)
    torch.set_num_threads(job.threads or os.cpu_count() or 1)
    teacher, tok = load_encoder(job.teacher)
    windows = training_windows(job, pre, teacher, tok, threads=job.threads, progress=progress)
    if "data" not in meta:
        save_meta(data={k: windows.meta[k] for k in ("key", "windows", "questions", "original_questions", "tokens",
                                                     "engine", "build_s")})
    model = copy.deepcopy(teacher)
    if "importance" not in meta:
        _log("head/neuron/channel importance on original training windows")
        save_meta(importance={"perms": importance_order(model, windows, pre.importance_batches, job.seed)})
    else:
        from .pipeline import _apply_perms

        _apply_perms(model, meta["importance"]["perms"])
    if job.shared_embeddings:
        swap_word_table(model, job.shared_embeddings, meta["importance"]["perms"].get("hidden"))
    space = SearchSpace.from_teacher(teacher.config, seq=pre.window.max_len, min_depth=pre.min_depth,
                                     hidden_fracs=pre.hidden_fracs)
    net = SuperNet(model, space)
    weights = out / "model.safetensors"
    if "training" not in meta:
        cfg = DistillConfig(steps=pre.steps, batch_size=pre.batch_size, lr=pre.lr, n_random=pre.n_random,
                            largest_every=pre.largest_every, flops_range=tuple(pre.flops_range),
                            shrink=tuple(pre.shrink), seed=job.seed, save_every=pre.save_every, time_budget_s=pre.seconds)
        _log(f"phase 1: sandwich rule on {len(windows)} cached windows, up to {cfg.steps} steps of {cfg.batch_size}"
             + (f", fitted to {pre.seconds / 60:.0f} minutes" if pre.seconds else ""))
        res = train_supernet(net, windows, cfg, out / "state", resume=resume, progress=progress)
        atomic_save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        save_meta(training={**res, "config": asdict(cfg)}, space=space.to_dict())
        clear_state(out / "state")  # only now: a crash before the line above resumes at the last step
    else:
        model.load_state_dict(load_file(str(weights)))
    if "reference" not in meta:
        meta["reference"] = reference_f1(net, tok, job.data, pre.reference_dev)
        save_meta(reference=meta["reference"])
    save_meta(wall_s_last_run=time.perf_counter() - t_start)
    return {"out": str(out), **{k: meta[k] for k in ("teacher_digest", "data", "training", "reference")}}


def importance_order(model, windows, batches: int, seed: int) -> dict:
    """Head / FFN-neuron / hidden-channel importance on `batches` x 16 original training windows (drawn
    with `seed`); reorders `model` so that "the first k" are the best k and returns the permutations."""
    originals = np.flatnonzero(windows.original)
    pick = np.random.default_rng(seed).choice(originals, min(len(originals), batches * 16), replace=False)
    imp = compute_importance(model, windows.features(pick), batches=batches, batch_size=16)
    return reorder(model, imp)


def reference_f1(net: SuperNet, tok, data: Path, n: int) -> dict:
    from .pipeline import data_files
    from .search import eval_stride

    _, dev_file = data_files(data)
    dev = squad.read_squad(dev_file, n)
    seq = 384
    feats = squad.make_features(tok, dev, seq, eval_stride(seq))
    sp = replace(net.space, seq_choices=[seq])
    L, H, F = sp.teacher_layers, sp.teacher_heads, sp.teacher_ffn
    shapes = {"largest": sp.largest(seq), "L6-half-width": sp.uniform(L, H // 2, F // 2, seq),
              "L3-full-width": sp.uniform(max(sp.depths) // 2, H, F, seq), "smallest": sp.smallest(seq)}
    out = {}
    for name, arch in shapes.items():
        out[name] = {"arch": arch.to_dict(), "f1": squad.score(net.runner(arch), dev, feats)[0]["f1"]}
        _log(f"reference {name} {arch.shape_key()}: F1 {out[name]['f1']:.2f} on {len(dev)} dev questions")
    return {"questions": len(dev), "subnets": out}


def load(folder: str | Path, teacher_dir: str | Path) -> tuple[SuperNet, dict]:
    """A trained supernet for the search; refused if it belongs to another teacher or is unfinished."""
    folder = Path(folder)
    path = folder / "supernet.json"
    if not path.exists():
        raise CanaoError(f"{folder}: not a supernet folder (no supernet.json); make one with `canao supernet train`")
    meta = json.loads(path.read_text())
    if "training" not in meta or not (folder / "model.safetensors").exists():
        raise CanaoError(f"{folder}: the supernet's training has not finished; run `canao supernet train ... --resume`")
    tdig = teacher_digest(teacher_dir)
    if meta["teacher_digest"] != tdig:
        raise CanaoError(f"{folder} was trained from another teacher than {teacher_dir} (digest {meta['teacher_digest']}, "
                         f"this one {tdig})")
    model, _ = load_encoder(teacher_dir)
    state = load_file(str(folder / "model.safetensors"))
    if "bert." + WORD_TABLE not in state:
        raise CanaoError(f"{folder}/model.safetensors lacks the word-embedding table")
    model.load_state_dict(state)
    return SuperNet(model.eval(), SearchSpace.from_dict(meta["space"])), meta
