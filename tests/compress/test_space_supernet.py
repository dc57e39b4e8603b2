import random

import numpy as np
import pytest
import torch

from canao.compress.importance import compute_importance, reorder
from canao.compress.space import Arch, SearchSpace, keep_layers, model_bytes
from canao.compress.supernet import SuperNet
from canao.errors import CanaoError
from canao.models.bert import BertConfig, BertForQuestionAnswering
from canao.tasks import squad


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, layer_heads=[4] * 4, layer_ffn=[64] * 4, head_dim=8,
                     max_position_embeddings=64)
    return BertForQuestionAnswering(cfg).eval()


def inputs(seed=0, b=2, s=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (b, s), generator=g)
    tt = torch.zeros_like(ids)
    tt[:, s // 2:] = 1
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, tt, mask


def test_keep_layers():
    assert keep_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    assert keep_layers(3, 6) == [1, 3, 5]
    assert keep_layers(1, 6) == [5]
    with pytest.raises(CanaoError):
        keep_layers(7, 6)


def test_space_bounded_by_teacher():
    space = SearchSpace.from_teacher(BertConfig())
    assert space.head_choices[-1] == 12 and space.ffn_choices[-1] == 1536
    assert space.depths == [1, 2, 3, 4, 5, 6]
    rng = random.Random(0)
    for _ in range(50):
        a = space.sample(rng)
        assert space.contains(a)
        assert Arch.from_dict(a.to_dict()) == a
    base = SearchSpace.from_teacher(BertConfig.uniform(12, 768, 12, 3072))
    assert base.largest().depth == 12 and base.ffn_choices[-1] == 3072
    assert model_bytes(space.smallest(), BertConfig()) < model_bytes(space.largest(), BertConfig())


def test_reorder_keeps_function_and_sorts_importance():
    model = tiny_model()
    ids, tt, mask = inputs()
    with torch.no_grad():
        before = model(ids, tt, mask)
    rng = np.random.default_rng(0)
    imp = {"heads": [rng.random(4) for _ in range(4)], "ffn": [rng.random(64) for _ in range(4)],
           "hidden": rng.random(32)}
    perms = reorder(model, imp)
    with torch.no_grad():
        after = model(ids, tt, mask)
    for x, y in zip(before, after):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert perms["heads"][0] == list(np.argsort(-imp["heads"][0], kind="stable"))
    assert perms["hidden"] == list(np.argsort(-imp["hidden"], kind="stable"))  # the residual stream permuted too
    assert not torch.equal(model.qa_outputs.weight, tiny_model().qa_outputs.weight)


def test_hidden_width_is_a_search_dimension():
    cfg = BertConfig()  # hidden 384
    space = SearchSpace.from_teacher(cfg)
    assert space.hidden_choices == [192, 288, 384] and space.hiddens() == [192, 288, 0]
    assert space.largest().hidden == 0 and space.smallest().hidden == 192
    narrow = Arch((12,), (1536,), 384, "fp32", 192)
    assert narrow.key() == "L1-d192-h12-f1536-s384-fp32" and Arch.from_dict(narrow.to_dict()) == narrow
    assert Arch((12,), (1536,)).key() == "L1-h12-f1536-s384-fp32"  # teacher width: the key as before
    assert model_bytes(narrow, cfg) < model_bytes(Arch((12,), (1536,)), cfg)
    assert {a.hidden for a in (space.sample(random.Random(i)) for i in range(30))} == {0, 192, 288}


def test_importance_on_teacher(teacher, data_dir):
    model, tok = teacher
    ex = squad.read_squad(data_dir / "squad" / "train-subset-v1.1.json", limit=8)
    feats = squad.make_features(tok, ex, 128, 32, with_labels=True)
    imp = compute_importance(model, feats, batches=1, batch_size=4)
    assert len(imp["heads"]) == 6 and imp["heads"][0].shape == (12,)
    assert imp["ffn"][0].shape == (1536,) and np.all(imp["ffn"][0] >= 0) and imp["ffn"][0].sum() > 0
    assert not any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", [Arch((4, 4, 4, 4), (64, 64, 64, 64), 12), Arch((1, 3), (8, 40), 12),
                                  Arch((2,), (64,), 12), Arch((4, 1, 2), (16, 64, 8), 12),
                                  Arch((4, 2), (64, 16), 12, hidden=16), Arch((1,), (8,), 12, hidden=24)])
def test_extract_equals_slicing(arch):
    model = tiny_model()
    space = SearchSpace.from_teacher(model.config)
    net = SuperNet(model, space).eval()
    ids, tt, mask = inputs()
    sub = net.extract(arch)
    assert sub.config.layer_heads == list(arch.heads) and sub.config.layer_ffn == list(arch.ffn)
    assert sub.config.hidden_size == (arch.hidden or 32)
    with torch.no_grad():
        s1, e1, hid, att = net(ids, tt, mask, arch=arch, output_attentions=True)
        s2, e2, out = sub.forward_with_features(ids, tt, mask, output_attentions=True)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(e1, e2, atol=1e-6, rtol=1e-6)
    for a, b in zip(hid, out.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(att, out.attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_largest_subnet_is_the_model():
    model = tiny_model()
    net = SuperNet(model, SearchSpace.from_teacher(model.config)).eval()
    ids, tt, mask = inputs()
    with torch.no_grad():
        s1, e1, _, _ = net(ids, tt, mask, arch=net.space.largest(12))
        s2, e2 = model(ids, tt, mask)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=1e-6)


def test_gradients_reach_shared_weights():
    model = tiny_model()
    net = SuperNet(model, SearchSpace.from_teacher(model.config)).train()
    ids, tt, mask = inputs()
    s, e, _, _ = net(ids, tt, mask, arch=Arch((2,), (16,), 12))
    (s.sum() + e.sum()).backward()
    q = model.bert.encoder.layer[3].attention.self.query.weight.grad
    assert q[:16].abs().sum() > 0 and q[16:].abs().sum() == 0
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is None


def test_narrow_student_compiles_and_matches_pytorch(teacher, tmp_path):
    """A sub-network with a narrower residual stream (and heads x head_dim != hidden) goes through
    the compiler like any other candidate."""
    from canao.compress.oracle import artifact_runner, compile_final

    model, _ = teacher
    net = SuperNet(model, SearchSpace.from_teacher(model.config))
    arch = Arch((12, 6, 4), (1536, 768, 384), 64, "fp32", 192)
    sub = net.extract(arch)
    compile_final(sub, tmp_path / "art", arch, 1)
    run, close = artifact_runner(tmp_path / "art", 1)
    ids = np.random.default_rng(0).integers(1000, 2000, (1, 50))
    tt, mask = np.zeros_like(ids), np.ones_like(ids)
    try:
        s, e = run(ids, tt, mask)
    finally:
        close()
    with torch.no_grad():
        rs, re_ = sub(*[torch.as_tensor(x) for x in (ids, tt, mask)])
    assert np.abs(s - rs.numpy()).max() < 1e-4 and np.abs(e - re_.numpy()).max() < 1e-4
