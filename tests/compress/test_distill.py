import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from canao.compress import distill
from canao.compress.distill import (BatchPlan, DistillConfig, cached_loss, distill_student, flops, logits_kl,
                                    opened_at, sandwich, train_supernet)
from canao.compress.space import SearchSpace
from canao.compress.supernet import SuperNet, copy_teacher
from canao.compress.teacher_cache import CachedWindows
from canao.models.bert import BertConfig, BertForQuestionAnswering


def tiny(seed=0, heads=4, ffn=64, layers=4, hidden=32):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, layer_heads=[heads] * layers, layer_ffn=[ffn] * layers,
                     head_dim=8, max_position_embeddings=64, dropout=0.0)
    return BertForQuestionAnswering(cfg)


def windows_of(teacher, n=48, seed=0):
    """Ragged windows of random tokens with the teacher's own logits, as the cache stores them."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(6, 17, n)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = rng.integers(1, 100, offsets[-1]).astype(np.int32)
    types = np.zeros(offsets[-1], np.uint8)
    starts = np.array([rng.integers(0, L) for L in lens], np.int32)
    w = CachedWindows(tokens, types, offsets, starts, starts, np.arange(n, dtype=np.int32),
                      (np.arange(n) % 3 == 0).astype(np.uint8))
    logits = np.zeros((offsets[-1], 2), np.float16)
    with torch.no_grad():
        for i in range(n):
            b = w.batch([i])
            s, e = teacher(b["ids"], b["types"], b["mask"])
            logits[offsets[i]:offsets[i + 1], 0] = s[0].numpy()
            logits[offsets[i]:offsets[i + 1], 1] = e[0].numpy()
    w.t_logits = logits
    return w


def test_cached_loss_vanishes_for_the_teachers_own_outputs_and_masks_padding():
    t = tiny().eval()
    w = windows_of(t, 6)
    b = w.batch(np.arange(6))
    with torch.no_grad():
        s, e = t(b["ids"], b["types"], b["mask"])
    assert float(cached_loss(s, e, b, 1.0, 0.0)) < 1e-4  # fp16 storage of the logits
    assert float(cached_loss(s, e, b, 1.0, 0.5)) > 0.01  # the hard labels are not the teacher's argmax
    assert float(logits_kl(s, e, e, s, b["mask"])) > 0
    s2 = s.clone()
    s2[b["mask"] == 0] += 100  # padded positions do not count
    assert abs(float(logits_kl(s2, e, s, e, b["mask"])) - float(logits_kl(s, e, s, e, b["mask"]))) < 1e-5


def test_batch_plan_is_a_function_of_seed_and_step_and_pads_little():
    lens = np.random.default_rng(0).integers(5, 300, 5000)
    a, b = BatchPlan(lens, 16, 3), BatchPlan(lens, 16, 3)
    steps = [0, 7, 400, 312, 7, 1000]
    for s in steps:
        assert np.array_equal(a(s), b(s))
    one_epoch = np.concatenate([a(s) for s in range(a.per_epoch)])
    assert len(set(one_epoch.tolist())) == len(one_epoch)  # a permutation: no window twice in an epoch
    padded = np.mean([lens[a(s)].max() * 16 / lens[a(s)].sum() for s in range(50)])
    assert padded < 1.1  # length-sorted chunks: random batches would pad about 1.5x


def test_sandwich_is_deterministic_shrinks_progressively_and_keeps_the_flop_range():
    space = SearchSpace.from_teacher(tiny(layers=6, heads=6, ffn=96, hidden=48).config, seq=16,
                                     hidden_fracs=(0.5, 1.0))
    cfg = DistillConfig(steps=100, n_random=3, largest_every=2, flops_range=(0.1, 0.6), shrink=(0.2, 0.5))
    assert sandwich(space, 5, cfg) == sandwich(space, 5, cfg)
    assert opened_at(0, 100, cfg.shrink) == {"depth"} and "hidden" in opened_at(60, 100, cfg.shrink)
    early = sandwich(space, 10, cfg)  # only depth is elastic yet
    assert early[0] == space.largest() and all(set(a.heads) == {6} and a.hidden == 0 for a in early)
    assert sandwich(space, 11, cfg)[0] != space.largest()  # the largest every second step only
    late = [a for s in range(60, 100) for a in sandwich(space, s, cfg)[2:]]
    top = flops(space.largest(), space)
    assert all(0.1 <= flops(a, space) / top <= 0.6 for a in late)
    assert any(a.hidden for a in late) and len({a.heads for a in late}) > 3


def test_supernet_training_resumes_to_the_same_weights(tmp_path):
    teacher = copy_teacher(tiny(seed=1).eval())
    windows = windows_of(teacher)
    space = SearchSpace.from_teacher(teacher.config, seq=16, hidden_fracs=(0.5, 1.0))
    cfg = DistillConfig(steps=6, batch_size=8, lr=1e-3, save_every=3, n_random=1, bf16=False, shrink=(0.3, 0.6))

    class Stop(Exception):
        pass

    def stop(step, loss):
        if step == 4:
            raise Stop

    model = tiny(seed=1)
    with pytest.raises(Stop):
        train_supernet(SuperNet(model, space), windows, cfg, tmp_path / "state", progress=False, on_step=stop)
    assert (tmp_path / "state" / "progress.json").exists()
    model = tiny(seed=1)  # a new process: only what was saved survives
    res = train_supernet(SuperNet(model, space), windows, cfg, tmp_path / "state", resume=True, progress=False)
    # the final state stays until the caller has saved the weights (then finetune.clear_state)
    assert res["steps"] == 6 and json.loads((tmp_path / "state" / "progress.json").read_text())["step"] == 6
    model2 = tiny(seed=1)
    train_supernet(SuperNet(model2, space), windows, cfg, tmp_path / "state2", progress=False)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, tiny(seed=1).bert.embeddings.word_embeddings.weight)


def test_phase2_learns_and_keeps_its_best_checkpoint(tmp_path):
    teacher = copy_teacher(tiny(seed=2).eval())
    windows = windows_of(teacher)
    student = tiny(seed=3, heads=2, ffn=16, layers=2)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = DistillConfig(steps=30, batch_size=8, lr=3e-3, warmup=0.0, bf16=False, eval_every=10)
    res = distill_student(student, windows, cfg, tmp_path / "a", progress=False)
    assert res["last_loss"] < res["first_loss"]
    # an evaluation that prefers the starting point: phase 2 hands back the starting weights
    scores = iter([50.0, 40.0, 45.0, 30.0])
    student = tiny(seed=3, heads=2, ffn=16, layers=2)
    res = distill_student(student, windows, cfg, tmp_path / "b", progress=False, evaluate=lambda: next(scores))
    assert res["best"] == {"f1": 50.0, "step": 0} and [e["step"] for e in res["evals"]] == [0, 10, 20, 30]
    for k, v in student.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_progressive_shrinking_follows_the_schedule_a_time_budget_fitted(tmp_path, monkeypatch):
    teacher = copy_teacher(tiny(seed=1).eval())
    windows = windows_of(teacher)
    space = SearchSpace.from_teacher(teacher.config, seq=16, hidden_fracs=(0.5, 1.0))
    seen = []
    real = distill.sandwich
    monkeypatch.setattr(distill, "sandwich", lambda sp, step, cfg, total=None: seen.append((step, total))
                        or real(sp, step, cfg, total))
    cfg = DistillConfig(steps=100_000, batch_size=4, time_budget_s=0.3, bf16=False, n_random=1, shrink=(0.2, 0.5))
    res = train_supernet(SuperNet(tiny(seed=1), space), windows, cfg, tmp_path / "s", progress=False)
    assert 10 <= res["steps"] < 1000  # the budget shortened the schedule...
    assert all(t == res["steps"] for s, t in seen if s >= 10)  # ...and the widths opened on the shortened one
    late = [a for s in range(int(0.6 * res["steps"]), res["steps"]) for a in real(space, s, cfg, res["steps"])]
    assert any(min(a.heads) < 4 for a in late) and any(min(a.ffn) < 64 for a in late)
    # a budget spent before the timing steps end: the step being run is the last, on the same schedule
    seen.clear()
    res = train_supernet(SuperNet(tiny(seed=1), space), windows, replace(cfg, time_budget_s=1e-9), tmp_path / "t",
                         progress=False)
    assert res["steps"] == 11 and seen[-1] == (10, 11)


# a phase-2 run in its own process, resumed after every kill; prints "ready" once it starts training
_KILLED_RUN = r"""
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_distill import tiny, windows_of

from canao.compress.distill import DistillConfig, distill_student
from canao.compress.supernet import copy_teacher
from canao.fileio import atomic_save_tensors

out = Path(sys.argv[1])
teacher = copy_teacher(tiny(seed=2).eval())
windows = windows_of(teacher)
student = tiny(seed=3, heads=2, ffn=16, layers=2)
cfg = DistillConfig(steps=60, batch_size=8, lr=3e-3, bf16=False, save_every=1, eval_every=20)
print("ready", flush=True)
# a score that depends on the weights only, so a resumed run keeps the same "best" as an uninterrupted one
score = lambda: float(sum(p.sum() for p in student.parameters()))
distill_student(student, windows, cfg, out / "state", resume=True, progress=False, evaluate=score)
atomic_save_tensors(student.state_dict(), out / "final.safetensors")
"""


def _killed_run(out: Path, kill_after: float | None) -> tuple[bool, float]:
    """Run _KILLED_RUN into `out`; with kill_after, SIGKILL it that long after it starts training."""
    from kill_helpers import run_killed

    return run_killed(_KILLED_RUN, [out, Path(__file__).parent], kill_after, timeout=120)


def test_phase2_killed_twenty_times_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """SIGKILL at random moments (mid-step, mid-checkpoint, mid-swap), resumed each time: the same weights."""
    from safetensors.torch import load_file

    finished, span = _killed_run(tmp_path / "whole", None)
    assert finished
    rng = random.Random(0)
    kills = 0
    while kills < 20:  # short kill windows: each run gets a little further
        finished, _ = _killed_run(tmp_path / "killed", rng.uniform(0.0, span / 10))
        if finished:
            break
        kills += 1
    if not finished:
        assert _killed_run(tmp_path / "killed", None)[0]
    want, got = (load_file(str(tmp_path / d / "final.safetensors")) for d in ("whole", "killed"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert kills == 20 or kills >= 10, kills
