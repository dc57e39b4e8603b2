"""Distillation: losses, phase 1 (supernet, sandwich rule) and phase 2 (TinyBERT-style).

Losses
- logits: KL(teacher || student) of start and end distributions at temperature T (x T^2),
  padded positions masked out;
- hidden states: MSE between the student's hidden states and the teacher's at the
  mapped layers (embeddings -> embeddings, student layer i -> the teacher layer it was
  sliced from); a learned linear projection only when the widths differ;
- attention maps: KL(teacher || student) over the keys of each query, per head, the
  student's head j against the teacher's head j (heads are importance-ordered, so
  a sliced student keeps the teacher's first heads), padded positions masked out.

Phase 1 trains the supernet: each step the largest, the smallest and `n_random`
random sub-networks are distilled from the frozen teacher on the same batch and
their gradients summed (the sandwich rule). Phase 2 distills one extracted
architecture: first the intermediate layers (hidden + attention), then the
predictions (logits + hard labels), as TinyBERT does.

Training state (weights, optimizer moments, step, RNG) is saved as safetensors + JSON
with the fine-tuning module's checkpoint functions, so `resume=True` continues.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import CanaoError
from ..train.finetune import _device, _load_state, _lr_factor, _optimizer, _save_state
from .space import Arch, keep_layers

NEG = -1e4


# ---------------------------------------------------------------- losses
def logits_kl(s_start, s_end, t_start, t_end, mask, temperature: float = 2.0) -> torch.Tensor:
    T = temperature
    keep = mask.bool()
    loss = 0.0
    for s, t in ((s_start, t_start), (s_end, t_end)):
        s = s.float().masked_fill(~keep, NEG) / T
        t = t.float().masked_fill(~keep, NEG) / T
        loss = loss + F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return loss / 2 * T * T


def hidden_mse(s_hidden, t_hidden, mask, proj: nn.Module | None = None) -> torch.Tensor:
    s, t = s_hidden.float(), t_hidden.float()
    if proj is not None:
        s = proj(s)
    elif s.shape[-1] < t.shape[-1]:  # a narrower sub-network holds the teacher's first channels
        t = t[..., :s.shape[-1]]
    err = ((s - t) ** 2).mean(-1)
    m = mask.float()
    return (err * m).sum() / m.sum()


def attention_kl(s_attn, t_attn, mask) -> torch.Tensor:
    """s_attn (b, h, q, k) against the teacher's first h heads."""
    h = s_attn.shape[1]
    t = t_attn[:, :h].float()
    s = s_attn.float()
    kl = (t * (torch.log(t.clamp_min(1e-12)) - torch.log(s.clamp_min(1e-12)))).sum(-1)  # (b, h, q)
    m = mask.float()[:, None, :]
    return (kl * m).sum() / (m.sum() * h)


def qa_ce(start, end, starts, ends) -> torch.Tensor:
    return (F.cross_entropy(start.float(), starts) + F.cross_entropy(end.float(), ends)) / 2


class Projections(nn.Module):
    """Learned student->teacher projections, one per mapped hidden state, only where widths differ.
    They start as the identity into the teacher's first channels: a student sliced from the
    importance-ordered teacher holds exactly those, so training starts from matching them."""

    def __init__(self, student_hidden: int, teacher_hidden: int, n: int):
        super().__init__()
        self.maps = None
        if student_hidden != teacher_hidden:
            self.maps = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in range(n))
            k = min(student_hidden, teacher_hidden)
            with torch.no_grad():
                for lin in self.maps:
                    lin.weight.zero_()
                    lin.weight[:k, :k] = torch.eye(k)
                    lin.bias.zero_()

    def get(self, i: int):
        return None if self.maps is None else self.maps[i]


# ---------------------------------------------------------------- config
@dataclass
class DistillConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    temperature: float = 2.0
    w_logit: float = 1.0
    w_hidden: float = 1.0
    w_attn: float = 1.0
    w_ce: float = 0.5
    n_random: int = 2  # phase 1: random sub-networks per step besides the largest and smallest
    seed: int = 0
    save_every: int = 100
    time_budget_s: float | None = None  # fit the step count to this much training time (timed over the first steps)


def _batches(feats, cfg: DistillConfig, step: int):
    """The batch of a step: a pure function of (seed, step), so a resumed run sees the same data."""
    per_epoch = max(1, len(feats) // cfg.batch_size)
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng(cfg.seed + epoch).permutation(len(feats))
    return order[within * cfg.batch_size:(within + 1) * cfg.batch_size]


def _tensors(feats, idx, device):
    width = int(feats.lengths()[idx].max())
    batch = [torch.as_tensor(a[idx, :width], device=device)
             for a in (feats.input_ids, feats.token_type_ids, feats.attention_mask)]
    labels = [torch.as_tensor(a[idx], device=device) for a in (feats.start_positions, feats.end_positions)]
    return batch, labels


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _teacher_out(teacher, batch):
    with torch.no_grad():
        ts, te, out = teacher.forward_with_features(*batch, output_attentions=True)
    return ts, te, out.hidden_states, out.attentions


def _loss(cfg, student_out, teacher_out, layer_map, mask, labels, parts=("logit", "hidden", "attn", "ce"), proj=None):
    ss, se, sh, sa = student_out
    ts, te, th, ta = teacher_out
    terms = {}
    if "logit" in parts:
        terms["logit"] = cfg.w_logit * logits_kl(ss, se, ts, te, mask, cfg.temperature)
    if "ce" in parts and cfg.w_ce:
        terms["ce"] = cfg.w_ce * qa_ce(ss, se, *labels)
    if "hidden" in parts:
        pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map)]
        terms["hidden"] = cfg.w_hidden * sum(hidden_mse(sh[i], th[t], mask, proj.get(k) if proj else None)
                                             for k, (i, t) in enumerate(pairs)) / len(pairs)
    if "attn" in parts and sa is not None:
        terms["attn"] = cfg.w_attn * sum(attention_kl(sa[i], ta[t], mask) for i, t in enumerate(layer_map)) / len(layer_map)
    return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}


def _finish_state(state_dir: Path) -> None:
    if state_dir.exists():
        for f in state_dir.iterdir():
            f.unlink()
        state_dir.rmdir()


def _run(model, params_model, cfg: DistillConfig, feats, state_dir: Path, resume: bool, step_loss, desc: str,
         progress: bool, on_step=None) -> dict:
    """The shared loop: AdamW + warm-up/decay, clipping, checkpoints, resume."""
    device = _device()
    torch.manual_seed(cfg.seed)
    params_model.to(device).train()
    opt = _optimizer(params_model, cfg)
    step = 0
    if resume and state_dir.exists():
        step = _load_state(state_dir, params_model, opt, device)
    total = max(1, cfg.steps)
    warmup = int(total * cfg.warmup)
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", disable=not progress)
    losses, t0 = [], time.perf_counter()
    first = None
    start_step = step
    while step < total:
        if cfg.time_budget_s and start_step == 0 and step == 2:
            t_warm = time.perf_counter()  # the first steps pay for warm-up (allocator, kernels): time after them
        if cfg.time_budget_s and start_step == 0 and step == 6:
            rate = (time.perf_counter() - t_warm) / 4
            fit = 6 + int((cfg.time_budget_s - (time.perf_counter() - t0)) / rate)
            if fit < total:  # shorten the schedule itself, so the learning rate still decays to zero
                total = max(6, fit)
                warmup = min(warmup, int(total * cfg.warmup))
                bar.total = total
        idx = _batches(feats, cfg, step)
        batch, labels = _tensors(feats, idx, device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, total, warmup)
        opt.zero_grad(set_to_none=True)
        loss = step_loss(step, batch, labels)  # does its own backward passes
        torch.nn.utils.clip_grad_norm_(params_model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss)
        first = first if first is not None else loss
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if step % cfg.save_every == 0 and step < total:
            _save_state(state_dir, params_model, opt, step, cfg)
        if on_step is not None:
            on_step(step, loss)
    bar.close()
    params_model.eval()
    _finish_state(state_dir)
    return {"steps": step, "planned_steps": cfg.steps, "first_loss": first, "last_loss": float(np.mean(losses[-20:])) if losses else None,
            "train_s": time.perf_counter() - t0, "device": device.type}


# ---------------------------------------------------------------- phase 1
def sandwich(space, step: int, seed: int, n_random: int) -> list[Arch]:
    rng = random.Random(seed * 1_000_003 + step)
    seq = space.seq_choices[0]
    return [space.largest(seq), space.smallest(seq)] + [space.sample(rng) for _ in range(n_random)]


def train_supernet(supernet, teacher, feats, cfg: DistillConfig, state_dir: str | Path, resume: bool = False,
                   progress: bool = True, on_step=None) -> dict:
    """Phase 1: sandwich-rule distillation of every sub-network from the teacher."""
    device = _device()
    teacher.to(device).eval()
    L = supernet.config.num_layers
    ac = _autocast(device)

    def step_loss(step, batch, labels):
        t_out = None
        total = 0.0
        with ac:
            t_out = _teacher_out(teacher, batch)
        for arch in sandwich(supernet.space, step, cfg.seed, cfg.n_random):
            with ac:
                s_out = supernet(*batch, arch=arch, output_attentions=cfg.w_attn > 0)
            loss, _ = _loss(cfg, s_out, t_out, keep_layers(arch.depth, L), batch[2], labels)
            loss.backward()
            total += loss.item()
        return total / (2 + cfg.n_random)

    res = _run(supernet, supernet.model, cfg, feats, Path(state_dir), resume, step_loss, "supernet", progress, on_step)
    teacher.cpu()
    supernet.model.cpu()
    return res


# ---------------------------------------------------------------- phase 2
class _WithProj(nn.Module):
    """Student + projections as one module, so the checkpoint holds both."""

    def __init__(self, student, proj):
        super().__init__()
        self.student, self.proj = student, proj


def distill_student(student, teacher, layer_map: list[int], feats, cfg: DistillConfig, state_dir: str | Path,
                    stage: str, resume: bool = False, progress: bool = True, on_step=None) -> dict:
    """Phase 2 for one architecture. stage "intermediate": hidden states + attention maps;
    stage "prediction": logits KL + hard-label CE."""
    if stage not in ("intermediate", "prediction"):
        raise CanaoError(f"unknown distillation stage {stage}")
    device = _device()
    teacher.to(device).eval()
    ac = _autocast(device)
    parts = ("hidden", "attn") if stage == "intermediate" else ("logit", "ce")
    proj = Projections(student.config.hidden_size, teacher.config.hidden_size, len(layer_map) + 1)
    wrapped = _WithProj(student, proj)

    def step_loss(step, batch, labels):
        with ac:
            t_out = _teacher_out(teacher, batch)
            s, e, out = student.forward_with_features(*batch, output_attentions="attn" in parts)
            loss, _ = _loss(cfg, (s, e, out.hidden_states, out.attentions), t_out, layer_map, batch[2], labels, parts, proj)
        loss.backward()
        return loss.item()

    res = _run(wrapped, wrapped, cfg, feats, Path(state_dir), resume, step_loss, f"distill:{stage}", progress, on_step)
    teacher.cpu()
    student.cpu().eval()
    return res


def save_config(path: Path, cfg: DistillConfig) -> None:
    path.write_text(json.dumps(asdict(cfg)))


def steps_for(epochs: float, n_windows: int, batch_size: int) -> int:
    return max(1, int(math.ceil(n_windows / batch_size) * epochs))
