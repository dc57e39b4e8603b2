import numpy as np
import torch

from canao.compress.distill import (DistillConfig, Projections, attention_kl, distill_student, hidden_mse, logits_kl,
                                    sandwich, train_supernet)
from canao.compress.space import Arch, SearchSpace
from canao.compress.supernet import SuperNet, copy_teacher
from canao.models.bert import BertConfig, BertForQuestionAnswering
from canao.tasks.squad import Features


def tiny(seed=0, heads=4, ffn=64, layers=4, hidden=32):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, layer_heads=[heads] * layers, layer_ffn=[ffn] * layers,
                     head_dim=8, max_position_embeddings=64, dropout=0.0)
    return BertForQuestionAnswering(cfg)


def fake_feats(n=32, s=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (n, s))
    mask = np.ones((n, s), np.int64)
    mask[::3, -4:] = 0
    tt = np.zeros((n, s), np.int64)
    starts = rng.integers(0, s - 4, n)
    return Features(ids, tt, mask, np.arange(n), [[None] * s] * n, starts, starts + 1)


def test_losses_vanish_for_identical_outputs():
    t = tiny().eval()
    f = fake_feats(4)
    batch = [torch.as_tensor(a) for a in (f.input_ids, f.token_type_ids, f.attention_mask)]
    with torch.no_grad():
        s, e, out = t.forward_with_features(*batch, output_attentions=True)
    mask = batch[2]
    assert float(logits_kl(s, e, s, e, mask)) < 1e-6
    assert float(hidden_mse(out.hidden_states[2], out.hidden_states[2], mask)) == 0
    assert abs(float(attention_kl(out.attentions[1], out.attentions[1], mask))) < 1e-6
    # a student with fewer heads is compared with the teacher's first heads
    assert abs(float(attention_kl(out.attentions[1][:, :2], out.attentions[1], mask))) < 1e-6
    assert float(logits_kl(s, e, e, s, mask)) > 0
    # padded positions do not count
    s2 = s.clone()
    s2[mask == 0] += 100
    assert abs(float(logits_kl(s2, e, s, e, mask))) < 1e-5


def test_projections_only_when_widths_differ():
    assert Projections(32, 32, 3).maps is None
    p = Projections(16, 32, 3)
    assert len(p.maps) == 3 and p.get(0).in_features == 16


def test_sandwich_is_deterministic_and_has_extremes():
    space = SearchSpace.from_teacher(tiny().config, seq=16)
    a = sandwich(space, 5, 0, 2)
    assert a == sandwich(space, 5, 0, 2) and a[0] == space.largest() and a[1] == space.smallest()


def test_supernet_training_lowers_small_subnet_loss_and_resumes(tmp_path):
    teacher = copy_teacher(tiny(seed=1).eval())
    model = tiny(seed=1)
    space = SearchSpace.from_teacher(model.config, seq=16)
    net = SuperNet(model, space)
    feats = fake_feats()
    cfg = DistillConfig(steps=6, batch_size=8, lr=1e-3, save_every=3, n_random=1)

    class Stop(Exception):
        pass

    def stop(step, loss):
        if step == 4:
            raise Stop

    try:
        train_supernet(net, teacher, feats, cfg, tmp_path / "state", progress=False, on_step=stop)
    except Stop:
        pass
    assert (tmp_path / "state" / "progress.json").exists()
    res = train_supernet(net, teacher, feats, cfg, tmp_path / "state", resume=True, progress=False)
    assert res["steps"] == 6 and not (tmp_path / "state").exists()
    # uninterrupted run gives the same weights
    model2 = tiny(seed=1)
    train_supernet(SuperNet(model2, space), teacher, feats, cfg, tmp_path / "state2", progress=False)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)


def test_phase2_stages_reduce_their_losses(tmp_path):
    teacher = copy_teacher(tiny(seed=2).eval())
    student = tiny(seed=3, heads=2, ffn=16, layers=2)
    feats = fake_feats()
    cfg = DistillConfig(steps=30, batch_size=8, lr=3e-3, warmup=0.0)
    r1 = distill_student(student, teacher, [1, 3], feats, cfg, tmp_path / "a", "intermediate", progress=False)
    r2 = distill_student(student, teacher, [1, 3], feats, cfg, tmp_path / "b", "prediction", progress=False)
    assert r1["last_loss"] < r1["first_loss"] and r2["last_loss"] < r2["first_loss"]
