"""Fine-tune a BERT-family encoder for SQuAD span extraction.

AdamW with linear warm-up then linear decay; CUDA with bf16 autocast when present,
the CPU otherwise. Training checkpoints (weights, optimizer moments, progress) are
written as safetensors + JSON every `save_every` steps, so `--resume` continues
from the last one and a crash loses at most that many steps.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..errors import CanaoError
from ..fileio import atomic_save_tensors, atomic_write_text, run_lock
from ..models.encoders import load_encoder, save_encoder
from ..tasks import squad

CHECKPOINT = "training-state"


@dataclass
class FinetuneConfig:
    epochs: float = 4.0
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    warmup: float = 0.1
    max_len: int = 384
    stride: int = 128
    seed: int = 0
    limit: int | None = None  # train questions (None = all)
    max_steps: int | None = None  # stop early (for smoke runs); the schedule still spans `epochs`
    save_every: int = 200


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.optim.AdamW:
    # No weight decay on biases and LayerNorm weights, as in BERT's recipe.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _save_state(folder: Path, model, opt, step: int, cfg: FinetuneConfig, extra=None) -> None:
    """`extra(tmp_folder)` writes further files that must travel with this state (a crash between
    them and the state would pair a new state with old extras). The new state is written whole
    into FOLDER.tmp (progress.json last: it marks the folder complete), the old one is moved to
    FOLDER.old, the new one into place, the old one removed: at every moment one complete state
    exists, and recover_state finishes a swap a crash interrupted."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"optim.{i}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()  # dropout masks continue as if never interrupted
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_save_tensors(tensors, tmp / "state.safetensors")
    if extra is not None:
        extra(tmp)
    atomic_write_text(tmp / "progress.json", json.dumps({"step": step, "config": asdict(cfg)}))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_state(folder: Path) -> bool:
    """Complete a checkpoint swap that a crash interrupted (see _save_state); True when `folder` then
    holds a complete training state."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if not (folder / "progress.json").exists():
        for candidate in (tmp, old):  # the newer complete one first
            if (candidate / "progress.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                candidate.rename(folder)
                break
    if (folder / "progress.json").exists():
        shutil.rmtree(old, ignore_errors=True)
        return True
    return False


def clear_state(folder: Path) -> None:
    """Remove a training state and its swap folders: called once what it trained is saved."""
    folder = Path(folder)
    for f in (folder, folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")):
        shutil.rmtree(f, ignore_errors=True)


def _load_state(folder: Path, model, opt, device) -> int:
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        progress = json.loads((folder / "progress.json").read_text())
    except Exception as exc:  # noqa: BLE001 - any unreadable state is the same user problem
        raise CanaoError(f"{folder}: training state unreadable ({exc}); delete it to start over") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"optim.{i}.step" in tensors:
            opt.state[p] = {key: tensors[f"optim.{i}.{key}"].to(device) for key in ("step", "exp_avg", "exp_avg_sq")}
            opt.state[p]["step"] = opt.state[p]["step"].cpu()
    return int(progress["step"])


def finetune_squad(base: str | Path, train_file: str | Path, out: str | Path, cfg: FinetuneConfig,
                   resume: bool = False, progress: bool = True, on_step=None) -> dict:
    """Train and save to `out` (Hugging Face layout). `on_step(step, loss)` is called after
    every optimizer step (progress reporting; tests use it to interrupt a run)."""
    out = Path(out)
    state_dir = out / CHECKPOINT
    with run_lock(out, "finetune"):
        return _finetune(base, train_file, out, state_dir, cfg, resume, progress, on_step)


def _finetune(base, train_file, out: Path, state_dir: Path, cfg: FinetuneConfig, resume: bool, progress: bool,
              on_step) -> dict:
    has_state = recover_state(state_dir)
    if has_state and not resume:
        raise CanaoError(f"{out} holds an unfinished run; pass --resume to continue it or choose another --out")
    if resume and not has_state:
        raise CanaoError(f"nothing to resume in {out} (no {CHECKPOINT}/ folder)")
    torch.manual_seed(cfg.seed)
    device = _device()
    model, tok = load_encoder(base, task="qa", new_head_ok=True)
    model.to(device).train()
    examples = squad.read_squad(train_file, cfg.limit)
    feats = squad.make_features(tok, examples, cfg.max_len, cfg.stride, with_labels=True)
    steps_per_epoch = math.ceil(len(feats) / cfg.batch_size)
    total = max(1, int(steps_per_epoch * cfg.epochs))
    warmup = int(total * cfg.warmup)
    opt = _optimizer(model, cfg)
    step = _load_state(state_dir, model, opt, device) if resume else 0
    end_step = min(total, cfg.max_steps) if cfg.max_steps else total
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    lengths = feats.lengths()
    bar = tqdm(total=end_step, initial=step, desc="finetune", unit="step", disable=not progress)
    losses: list[float] = []
    t0 = time.perf_counter()
    while step < end_step:
        epoch, within = divmod(step, steps_per_epoch)
        # The order is a pure function of (seed, epoch), so a resumed run sees the same batches.
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(feats))
        idx = order[within * cfg.batch_size:(within + 1) * cfg.batch_size]
        width = int(lengths[idx].max())
        batch = [torch.as_tensor(a[idx, :width], device=device)
                 for a in (feats.input_ids, feats.token_type_ids, feats.attention_mask)]
        starts = torch.as_tensor(feats.start_positions[idx], device=device)
        ends = torch.as_tensor(feats.end_positions[idx], device=device)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, total, warmup)
        with autocast:
            s_logits, e_logits = model(*batch)
        loss = (torch.nn.functional.cross_entropy(s_logits.float(), starts)
                + torch.nn.functional.cross_entropy(e_logits.float(), ends)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if step % cfg.save_every == 0 and step < end_step:
            _save_state(state_dir, model, opt, step, cfg)
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()
    model.cpu().eval()
    save_encoder(model, out, base)
    clear_state(state_dir)  # finished: the saved model supersedes the training state
    return {
        "out": str(out),
        "device": device.type,
        "steps": step,
        "total_steps": total,
        "train_windows": len(feats),
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-20:])) if losses else None,
        "train_s": time.perf_counter() - t0,
    }
