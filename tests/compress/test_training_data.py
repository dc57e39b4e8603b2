"""Augmentation, the teacher cache and `canao supernet train` on the real teacher and data (small slices)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from canao.compress import teacher_cache
from canao.compress.augment import Augmented, AugmentRecipe, augment_from_teacher, neighbour_table
from canao.compress.teacher_cache import TeacherCache, WindowSettings, cache_key
from canao.errors import CanaoError
from canao.models.wordpiece import load_wordpiece
from canao.tasks import squad

ROOT = Path(__file__).resolve().parents[2]


def train_file(data_dir):
    return data_dir / "squad" / "train-subset-v1.1.json"


def test_neighbours_come_from_the_teachers_embeddings(teacher):
    model, tok = teacher
    emb = model.bert.embeddings.word_embeddings.weight.detach().numpy()
    table = neighbour_table(emb, tok.get_vocab(), 12, {"january", "river", "the", "built"})
    assert set(table) == {"january", "river", "built"}  # function words are never replaced
    assert "february" in table["january"] and "river" not in table["river"] and "constructed" in table["built"]
    assert all("the" not in v for v in table.values())


def test_augmented_copies_keep_the_answer_and_resume(tmp_path, teacher_dir, data_dir):
    recipe = AugmentRecipe(copies=3, shard_size=10)
    res = augment_from_teacher(teacher_dir, train_file(data_dir), tmp_path / "aug", recipe, limit=25, progress=False)
    assert res["shards"] == 3 and res["questions"] == 75
    aug = Augmented(tmp_path / "aug")
    copies = aug.examples()
    originals = squad.read_squad(train_file(data_dir), 25)
    assert len(copies) == 75
    changed = 0
    for i, ex in enumerate(copies):
        src = originals[i // 3]
        assert ex.context[ex.answer_starts[0]:ex.answer_starts[0] + len(ex.answers[0])] == src.answers[0]
        changed += (ex.context != src.context) + (ex.question != src.question)
    assert changed > 60  # most copies differ from their source in question or context
    # the windows label the answer where it is (the span survives tokenization)
    f = squad.make_features(load_wordpiece(teacher_dir), copies[:10], 256, 96, with_labels=True)
    assert (f.start_positions > 0).sum() >= 8
    # a lost shard is rebuilt with the same content; the others are not touched
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "aug").glob("shard-*")}
    (tmp_path / "aug" / "shard-00001.jsonl").unlink()
    res = augment_from_teacher(teacher_dir, train_file(data_dir), tmp_path / "aug", recipe, limit=25, progress=False)
    assert res["built_now"] == 1
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "aug").glob("shard-*")}
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert after["shard-00000.jsonl"][1] == before["shard-00000.jsonl"][1]
    with pytest.raises(CanaoError, match="another recipe"):
        augment_from_teacher(teacher_dir, train_file(data_dir), tmp_path / "aug", AugmentRecipe(copies=2), limit=25)


def test_teacher_cache_matches_the_teacher_and_resumes(tmp_path, teacher, data_dir, monkeypatch):
    model, tok = teacher
    ex = squad.read_squad(train_file(data_dir), 30)
    settings = WindowSettings(160, 64)
    key = cache_key("t", "d", settings)
    assert key != cache_key("t", "d", WindowSettings(256, 96)) != cache_key("t2", "d", settings)
    cache = TeacherCache(tmp_path / "c")
    saved = []
    real_save = teacher_cache.atomic_save_tensors

    def crash_after_two(tensors, path, metadata=None):
        if str(path).endswith(".safetensors") and "logits" in Path(path).name:
            if len(saved) == 2:
                raise KeyboardInterrupt("killed")
            saved.append(path)
        real_save(tensors, path, metadata)

    monkeypatch.setattr(teacher_cache, "atomic_save_tensors", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        cache.build(model, tok, ex, [True] * len(ex), key, settings, engine="canao", shard=16, threads=1, progress=False)
    assert not cache.complete()
    with pytest.raises(CanaoError, match="incomplete"):
        cache.load()
    monkeypatch.setattr(teacher_cache, "atomic_save_tensors", real_save)
    stamps = {p: p.stat().st_mtime_ns for p in saved}
    info = cache.build(model, tok, ex, [True] * len(ex), key, settings, engine="canao", shard=16, threads=1,
                       progress=False)
    assert info["complete"] and all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished shards kept
    w = cache.load()
    assert len(w) == info["windows"] > 30 and w.original.all()
    b = w.batch(np.arange(len(w)))
    with torch.no_grad():
        s, e = model(b["ids"], b["types"], b["mask"])
    m = b["mask"].bool()
    assert float((s - b["t_start"])[m].abs().max()) < 0.02 and float((e - b["t_end"])[m].abs().max()) < 0.02
    with pytest.raises(CanaoError, match="another key"):
        cache.build(model, tok, ex, [True] * len(ex), "other", settings)


TRAIN = """
import sys
from pathlib import Path
from canao.compress.supernet_train import SupernetJob, train
from canao.compress.teacher_cache import WindowSettings
job = SupernetJob(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), preset="quick", threads=1,
                  overrides=dict(train_limit=16, copies=1, window=WindowSettings(128, 32), importance_batches=1,
                                 steps=int(sys.argv[4]), seconds=None, batch_size=4, reference_dev=6, save_every=8))
train(job, resume=True, progress=False)
"""


def run_train(teacher_dir, data_dir, out, steps, env, kill_when=None):
    cmd = [sys.executable, "-c", TRAIN, str(teacher_dir), str(data_dir), str(out), str(steps)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_when is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        return
    deadline = time.time() + 600
    while not kill_when() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_supernet_train_survives_a_kill(tmp_path, teacher_dir, data_dir):
    env = {**os.environ, "CANAO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sn"
    # killed mid-training, after a checkpoint: the resumed run continues from it
    run_train(teacher_dir, data_dir, out, 24, env, kill_when=lambda: (out / "state" / "progress.json").exists())
    meta = json.loads((out / "supernet.json").read_text())
    assert "data" in meta and "importance" in meta and "training" not in meta
    step = json.loads((out / "state" / "progress.json").read_text())["step"]
    assert step >= 8
    run_train(teacher_dir, data_dir, out, 24, env)
    meta = json.loads((out / "supernet.json").read_text())
    assert meta["training"]["steps"] == 24 and (out / "model.safetensors").exists()
    assert not (out / "state").exists()
    ref = meta["reference"]["subnets"]
    assert ref["largest"]["f1"] > 40  # the largest sub-network is still (nearly) the teacher
    # the same run uninterrupted gives the same weights
    from safetensors.torch import load_file

    run_train(teacher_dir, data_dir, tmp_path / "sn2", 24, env)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "sn2" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3, msg=k)
