"""Distillation from the cached teacher: losses, the batch plan, phase 1 (supernet) and phase 2.

Every step reads the teacher's start/end logits from the cache (teacher_cache.py): a step
costs one student's forward and backward pass, nothing of the teacher's.

Loss: KL(teacher || student) of the start and end distributions at temperature T (x T^2),
padded positions masked out, plus `w_ce` x the hard-label cross-entropy on windows of
original (not augmented) questions, whose labels are the gold spans.

Phase 1 trains the supernet with the sandwich rule: each step the largest sub-network
(every `largest_every` steps: at the start its outputs equal the cached teacher's, so it
mostly anchors the shared weights), the smallest and `n_random` random sub-networks learn
from the cached teacher on the same batch, their gradients summed. Progressive shrinking
(Once-for-All) opens the elastic dimensions one after the other, at fractions of the
schedule: first depth, then FFN size and heads, then the hidden size. `flops_range` keeps
the draws to the sizes the budgets of interest select (fractions of the teacher's FLOPs):
"the smallest" is the smallest uniform sub-network of that range, and `uniform_share` of
the random draws give every layer the same width (sub-networks of mixed per-layer widths
that are never trained together score far lower).

Phase 2 distills one extracted architecture, evaluates it every `eval_every` steps on a
dev slice and keeps the best weights, the starting point included: phase 2 never returns a
model worse on that slice than the one it was given.

Dropout is off (distillation targets are soft, and the CPU's dropout masks cost a third of
a step), the word-embedding table is frozen (it is the teacher's, or a shared one that a
shipped model refers to instead of storing), and bf16 autocast is used on CUDA and on CPUs
with AVX512_BF16. Training state (weights, optimizer moments, step, RNG, best so far) is
saved as safetensors + JSON, so `resume=True` continues where a run stopped.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import CanaoError
from ..fileio import atomic_save_tensors
from ..train.finetune import _device, _load_state, _lr_factor, _optimizer, _save_state, recover_state
from .space import Arch, SearchSpace

NEG = -1e4


# ---------------------------------------------------------------- losses
def logits_kl(s_start, s_end, t_start, t_end, mask, temperature: float = 1.0) -> torch.Tensor:
    T = temperature
    keep = mask.bool()
    loss = 0.0
    for s, t in ((s_start, t_start), (s_end, t_end)):
        s = s.float().masked_fill(~keep, NEG) / T
        t = t.float().masked_fill(~keep, NEG) / T
        loss = loss + F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return loss / 2 * T * T


def qa_ce(start, end, starts, ends) -> torch.Tensor:
    return (F.cross_entropy(start.float(), starts) + F.cross_entropy(end.float(), ends)) / 2


def cached_loss(start, end, batch: dict, temperature: float, w_ce: float) -> torch.Tensor:
    """KL to the cached teacher logits + hard-label CE on the original questions' windows."""
    loss = logits_kl(start, end, batch["t_start"], batch["t_end"], batch["mask"], temperature)
    orig = batch["original"]
    if w_ce and bool(orig.any()):
        loss = loss + w_ce * qa_ce(start[orig], end[orig], batch["starts"][orig], batch["ends"][orig])
    return loss


# ---------------------------------------------------------------- config
@dataclass
class DistillConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.06
    temperature: float = 1.0
    w_ce: float = 0.1
    n_random: int = 2  # phase 1: random sub-networks per step besides the largest and smallest
    largest_every: int = 1  # phase 1: the largest sub-network every this many steps
    flops_range: tuple[float, float] = (0.0, 1.0)  # phase 1: random draws within these FLOP fractions of the teacher
    uniform_share: float = 0.5  # phase 1: share of random draws with the same heads and FFN size in every layer
    shrink: tuple[float, ...] = (0.2, 0.5)  # phase 1: step fractions where FFN+heads, then the hidden size, open
    eval_every: int = 0  # phase 2: F1 on the selection slice every this many steps (0: only at the end)
    seed: int = 0
    save_every: int = 100
    time_budget_s: float | None = None  # fit the step count to this much training time (timed over the first steps)
    bf16: bool | None = None  # autocast; None: on CUDA and on CPUs with AVX512_BF16


def use_bf16(cfg: DistillConfig, device) -> bool:
    if cfg.bf16 is not None:
        return cfg.bf16
    if device.type == "cuda":
        return True
    from ..compiler.targets import cpu_flags

    return "avx512_bf16" in cpu_flags()


def _autocast(enabled: bool, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def prepare_student(model) -> None:
    """Dropout off, word-embedding table frozen (see the module docstring)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)


# ---------------------------------------------------------------- batches
class BatchPlan:
    """The batch of a step: a pure function of (seed, step), so a resumed run sees the same data.
    Each epoch is a permutation; within chunks of 64 batches windows are sorted by length, so a
    batch pads little, and the batches of a chunk are shuffled."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.per_epoch = max(1, len(self.lengths) // batch_size)
        self._epoch, self._batches = None, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lengths))[:self.per_epoch * self.batch_size]
            batches = []
            chunk = 64 * self.batch_size
            for lo in range(0, len(order), chunk):
                part = order[lo:lo + chunk]
                part = part[np.argsort(self.lengths[part], kind="stable")]
                group = [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
                rng.shuffle(group)
                batches += group
            self._epoch, self._batches = epoch, batches
        return self._batches[within]


# ---------------------------------------------------------------- the loop
def _run(params_model, cfg: DistillConfig, windows, state_dir: Path, resume: bool, step_loss, desc: str,
         progress: bool, on_step=None, evaluate=None) -> dict:
    """AdamW + warm-up/decay, clipping, checkpoints, resume; with `evaluate` (a function of nothing
    returning F1) the best weights seen, the starting ones included, are kept and restored at the end."""
    device = _device()
    torch.manual_seed(cfg.seed)
    params_model.to(device).train()
    opt = _optimizer(params_model, cfg)
    plan = BatchPlan(windows.lengths(), cfg.batch_size, cfg.seed)
    bf16 = use_bf16(cfg, device)
    step, total = 0, max(1, cfg.steps)
    best, best_weights, evals = None, None, []  # best: {"f1", "step"} of the weights in best_weights
    if resume and recover_state(state_dir):
        step = _load_state(state_dir, params_model, opt, device)
        print(f"[distill] resuming {desc} at step {step}", file=sys.stderr, flush=True)
        extra = json.loads((state_dir / "run.json").read_text())
        total, best, evals = extra["total"], extra["best"], extra["evals"]
        if best is not None:
            from safetensors.torch import load_file

            best_weights = load_file(str(state_dir / "best.safetensors"))
    warmup = int(total * cfg.warmup)

    def consider(f1: float, at: int) -> None:
        nonlocal best, best_weights
        evals.append({"step": at, "f1": f1})
        if best is None or f1 > best["f1"]:
            best = {"f1": f1, "step": at}
            best_weights = {k: v.detach().cpu().clone() for k, v in params_model.state_dict().items()}

    def extras(folder: Path) -> None:  # written inside the new state folder, before it replaces the old one
        (folder / "run.json").write_text(json.dumps({"total": total, "best": best, "evals": evals}))
        if best_weights is not None:
            atomic_save_tensors(best_weights, folder / "best.safetensors")

    def evaluated(at: int) -> None:
        params_model.eval()
        consider(evaluate(), at)
        params_model.train()

    if evaluate is not None and step == 0:
        evaluated(0)  # the starting point is a candidate too
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", disable=not progress)
    losses, t0, first = [], time.perf_counter(), None
    start_step = step
    while step < total:
        if cfg.time_budget_s and start_step == 0 and step == 2:
            t_warm = time.perf_counter()  # the first steps pay for warm-up (allocator, kernels): time after them
        if cfg.time_budget_s and start_step == 0 and step == 10:  # 8 steps: a whole cycle of the sandwich's largest
            rate = (time.perf_counter() - t_warm) / 8
            fit = 10 + int((cfg.time_budget_s - (time.perf_counter() - t0)) / rate)
            if fit < total:  # shorten the schedule itself, so the learning rate still decays to zero
                total = max(step + 1, fit)  # this step runs either way: a budget already spent ends after it
                warmup = min(warmup, int(total * cfg.warmup))
                bar.total = total
        batch = windows.batch(plan(step), device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, total, warmup)
        opt.zero_grad(set_to_none=True)
        with _autocast(bf16, device):
            loss = step_loss(step, batch, total)  # does its own backward passes; total: the (fitted) schedule
        torch.nn.utils.clip_grad_norm_([p for p in params_model.parameters() if p.requires_grad], 1.0)
        opt.step()
        step += 1
        losses.append(loss)
        first = first if first is not None else loss
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", **({"best_f1": f"{best['f1']:.2f}"} if best else {}))
        if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            evaluated(step)
        if step % cfg.save_every == 0 and step < total:
            _save_state(state_dir, params_model, opt, step, cfg, extras)
        if on_step is not None:
            on_step(step, loss)
    bar.close()
    if step > start_step:  # the end too: a crash before the caller has saved the result resumes here
        _save_state(state_dir, params_model, opt, step, cfg, extras)
    if best_weights is not None and best["step"] != step:  # the end was not the best: go back
        params_model.load_state_dict({k: v.to(device) for k, v in best_weights.items()})
    params_model.eval()
    # the state stays until the caller has saved what it trained (then finetune.clear_state): a crash
    # in between resumes at the last step instead of training again
    return {"steps": step, "planned_steps": cfg.steps, "first_loss": first,
            "last_loss": float(np.mean(losses[-20:])) if losses else None, "train_s": time.perf_counter() - t0,
            "device": device.type, "bf16": bf16, "best": best, "evals": evals}


# ---------------------------------------------------------------- phase 1
def flops(arch: Arch, space: SearchSpace) -> float:
    """Multiply-adds of one window of arch.seq tokens (projections, attention, FFN)."""
    H = arch.hidden or space.hidden_size
    s, d = arch.seq, space.head_dim
    return sum(s * (4 * H * h * d + 2 * H * f) + 2 * s * s * h * d for h, f in zip(arch.heads, arch.ffn))


def elastic_space(space: SearchSpace, opened: set[str]) -> SearchSpace:
    """The space restricted to the dimensions progressive shrinking has opened (the rest at the teacher's)."""
    from dataclasses import replace

    return replace(space,
                   depths=space.depths if "depth" in opened else [max(space.depths)],
                   head_choices=space.head_choices if "heads" in opened else [space.teacher_heads],
                   ffn_choices=space.ffn_choices if "ffn" in opened else [space.teacher_ffn],
                   hidden_choices=space.hidden_choices if "hidden" in opened else [space.hidden_size],
                   seq_choices=[max(space.seq_choices)], precisions=[space.precisions[0]])


def opened_at(step: int, total: int, shrink: tuple[float, ...]) -> set[str]:
    opened = {"depth"}
    if len(shrink) > 0 and step >= shrink[0] * total:
        opened |= {"ffn", "heads"}
    if len(shrink) > 1 and step >= shrink[1] * total:
        opened.add("hidden")
    return opened


def smallest_in_range(sub: SearchSpace, space: SearchSpace, lo: float) -> Arch:
    """The uniform sub-network of `sub` with the fewest FLOPs at or above the fraction `lo` of the teacher's:
    the smallest model the budgets of interest select (the space's own smallest only trains a useless one)."""
    top = flops(space.largest(), space)
    uniform = [sub.uniform(d, h, f, hidden=w) for d in sub.depths for h in sub.head_choices for f in sub.ffn_choices
               for w in sub.hiddens() or [0]]
    fits = [a for a in uniform if flops(a, space) >= lo * top]
    return min(fits or uniform, key=lambda a: (flops(a, space), -a.depth))


def sandwich(space: SearchSpace, step: int, cfg: DistillConfig, total: int | None = None) -> list[Arch]:
    """The sub-networks of a step: deterministic in (seed, step). `total` is the schedule's length (after
    a time budget shortened it): progressive shrinking opens the dimensions at fractions of it."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    sub = elastic_space(space, opened_at(step, total or cfg.steps, cfg.shrink))
    teacher_flops = flops(space.largest(), space)
    lo, hi = cfg.flops_range
    out = [smallest_in_range(sub, space, lo)]
    if step % max(1, cfg.largest_every) == 0:
        out.insert(0, sub.largest())
    for _ in range(cfg.n_random):
        for _try in range(200):  # draws outside the FLOP range are redrawn
            arch = sub.sample(rng)
            if rng.random() < cfg.uniform_share:  # one width for every layer: the shapes budgets mostly pick
                arch = sub.uniform(arch.depth, arch.heads[0], arch.ffn[0], hidden=arch.hidden)
            if lo <= flops(arch, space) / teacher_flops <= hi:
                break
        out.append(arch)
    return out


def train_supernet(supernet, windows, cfg: DistillConfig, state_dir: str | Path, resume: bool = False,
                   progress: bool = True, on_step=None) -> dict:
    """Phase 1: sandwich-rule distillation of the supernet's sub-networks from the cached teacher."""
    prepare_student(supernet.model)
    space = supernet.space

    def step_loss(step, batch, total):
        archs = sandwich(space, step, cfg, total)
        loss_sum = 0.0
        for arch in archs:
            s, e, _, _ = supernet(batch["ids"], batch["types"], batch["mask"], arch=arch)
            loss = cached_loss(s, e, batch, cfg.temperature, cfg.w_ce)
            loss.backward()
            loss_sum += loss.item()
        return loss_sum / len(archs)

    res = _run(supernet.model, cfg, windows, Path(state_dir), resume, step_loss, "supernet", progress, on_step)
    supernet.model.cpu()
    return res


# ---------------------------------------------------------------- phase 2
def distill_student(student, windows, cfg: DistillConfig, state_dir: str | Path, resume: bool = False,
                    progress: bool = True, on_step=None, evaluate=None) -> dict:
    """Phase 2 for one architecture from the cached teacher; with `evaluate` the best weights are kept."""
    prepare_student(student)

    def step_loss(step, batch, total):
        s, e = student(batch["ids"], batch["types"], batch["mask"])
        loss = cached_loss(s, e, batch, cfg.temperature, cfg.w_ce)
        loss.backward()
        return loss.item()

    res = _run(student, cfg, windows, Path(state_dir), resume, step_loss, "distill", progress, on_step, evaluate)
    student.cpu().eval()
    return res


def save_config(path: Path, cfg: DistillConfig) -> None:
    path.write_text(json.dumps(asdict(cfg)))


def steps_for(epochs: float, n_windows: int, batch_size: int) -> int:
    return max(1, int(math.ceil(n_windows / batch_size) * epochs))


def check_windows(windows) -> None:
    if windows.t_logits is None:
        raise CanaoError("distillation needs the teacher's cached logits (teacher_cache.py); the windows have none")
