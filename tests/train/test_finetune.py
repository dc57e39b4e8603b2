"""Fine-tuning on the CPU: a short run learns, and an interrupted run resumes to the same weights."""

import pytest
import torch

from canao.errors import CanaoError
from canao.models.encoders import load_encoder
from canao.paths import builtin_model
from canao.tasks import squad
from canao.train.finetune import FinetuneConfig, finetune_squad

SMALL = dict(lr=3e-4, batch_size=8, max_len=128, stride=32, limit=24, warmup=0.1, save_every=2)


def _span_loss(model, feats) -> float:
    with torch.no_grad():
        s, e = model(*(torch.as_tensor(a) for a in (feats.input_ids, feats.token_type_ids, feats.attention_mask)))
        return float((torch.nn.functional.cross_entropy(s, torch.as_tensor(feats.start_positions))
                      + torch.nn.functional.cross_entropy(e, torch.as_tensor(feats.end_positions))) / 2)


def test_short_cpu_run_learns(data_dir, tmp_path):
    train = data_dir / "squad" / "train-subset-v1.1.json"
    torch.manual_seed(0)
    before, tok = load_encoder(builtin_model("minilm"), new_head_ok=True)
    feats = squad.make_features(tok, squad.read_squad(train, 24), 128, 32, with_labels=True)
    result = finetune_squad(builtin_model("minilm"), train, tmp_path / "ft", FinetuneConfig(epochs=4, **SMALL), progress=False)
    after, _ = load_encoder(tmp_path / "ft")
    assert result["steps"] == result["total_steps"]
    assert not (tmp_path / "ft" / "training-state").exists()
    loss_before, loss_after = _span_loss(before, feats), _span_loss(after, feats)
    assert loss_after < 0.6 * loss_before, (loss_before, loss_after)


def test_interrupted_run_resumes_to_identical_weights(data_dir, tmp_path):
    train = data_dir / "squad" / "train-subset-v1.1.json"
    cfg = FinetuneConfig(epochs=1, max_steps=4, **SMALL)
    finetune_squad(builtin_model("minilm"), train, tmp_path / "straight", cfg, progress=False)

    def crash(step, loss):
        if step == 3:  # after the checkpoint at step 2; step 3's work is lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_squad(builtin_model("minilm"), train, tmp_path / "resumed", cfg, progress=False, on_step=crash)
    with pytest.raises(CanaoError, match="--resume"):
        finetune_squad(builtin_model("minilm"), train, tmp_path / "resumed", cfg, progress=False)
    finetune_squad(builtin_model("minilm"), train, tmp_path / "resumed", cfg, resume=True, progress=False)

    a, _ = load_encoder(tmp_path / "straight")
    b, _ = load_encoder(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


# `canao finetune` in its own process, resumed (when a state is there) after every kill
_FINETUNE = r"""
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from canao.paths import builtin_model
from canao.train.finetune import CHECKPOINT, FinetuneConfig, finetune_squad, recover_state

train, out = sys.argv[1], Path(sys.argv[2])
cfg = FinetuneConfig(epochs=2, lr=3e-4, batch_size=8, max_len=128, stride=32, limit=24, warmup=0.1, save_every=1)
resume = recover_state(out / CHECKPOINT)
print("ready", flush=True)
finetune_squad(builtin_model("minilm"), train, out, cfg, resume=resume, progress=False)
"""


def _finetune_process(train, out, kill_after=None) -> tuple[bool, float]:
    from kill_helpers import run_killed

    return run_killed(_FINETUNE, [train, out], kill_after)


def test_finetune_killed_at_random_moments_ends_with_the_uninterrupted_weights(data_dir, tmp_path):
    import random

    train = data_dir / "squad" / "train-subset-v1.1.json"
    finished, span = _finetune_process(train, tmp_path / "straight")
    assert finished
    rng, kills, finished = random.Random(1), 0, False
    while kills < 3 and not finished:  # mid-load, mid-step, mid-checkpoint: wherever the kill lands
        finished, _ = _finetune_process(train, tmp_path / "killed", rng.uniform(0.3, 0.6) * span)
        kills += not finished
    if not finished:
        assert _finetune_process(train, tmp_path / "killed")[0]
    a, _ = load_encoder(tmp_path / "straight")
    b, _ = load_encoder(tmp_path / "killed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5, msg=name)
    assert kills >= 1  # the first run, killed before 60 % of its time, never finishes
