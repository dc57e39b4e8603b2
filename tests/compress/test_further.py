"""`canao distill`: a shipped student distilled further from the cached teacher, on a tiny slice."""

import json

import pytest
from safetensors import safe_open

from canao.cli import main
from canao.compress.further import FurtherJob, run
from canao.compress.teacher_cache import WindowSettings
from canao.errors import CanaoError

# 16 training questions, one augmented copy each, windows of 128 tokens: seconds, not minutes
TINY_DATA = dict(train_limit=16, copies=1, window=WindowSettings(128, 32), batch_size=4)


def job(tmp_path, teacher_dir, data_dir, **kw):
    return FurtherJob(teacher=teacher_dir, data=data_dir,
                      **{"out": tmp_path / "out", "student": "minilm-squad-8x", "minutes": None, "steps": 4, "eval_every": 2, "select_n": 30, "data_preset": "quick",
                         "data_overrides": TINY_DATA, **kw})


def test_distill_keeps_its_best_weights_and_the_shared_table(tmp_path, teacher_dir, data_dir):
    from canao.models.encoders import load_encoder

    res = run(job(tmp_path, teacher_dir, data_dir), progress=False)
    rec = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert rec["finished"] and rec["steps"] == 4 and [e["step"] for e in rec["evals"]] == [0, 2, 4]
    assert rec["start_f1"] == rec["evals"][0]["f1"] > 20  # the shipped student, scored before any step
    assert res["best"]["f1"] == max(e["f1"] for e in rec["evals"])  # never worse than where it started
    model_dir = tmp_path / "out" / "model"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert not any("word_embeddings" in k for k in f.keys())  # still refers to all-MiniLM's table
    model, _ = load_encoder(model_dir)
    assert model.config.layer_heads == [2, 6, 2, 2, 2, 2]
    assert not (tmp_path / "out" / "state").exists()  # the checkpoint folder goes once the run has finished

    with pytest.raises(CanaoError, match="holds an earlier run; pass --resume"):
        run(job(tmp_path, teacher_dir, data_dir), progress=False)
    with pytest.raises(CanaoError, match="this run has finished .* Choose another --out"):
        run(job(tmp_path, teacher_dir, data_dir), resume=True, progress=False)
    with pytest.raises(CanaoError, match="was started from .* --resume needs the same student"):
        rec.pop("finished")
        (tmp_path / "out" / "distill.json").write_text(json.dumps(rec))
        run(job(tmp_path, teacher_dir, data_dir, student="minilm-squad-4x"), resume=True, progress=False)


def test_distill_from_teacher_slices_of_an_architecture(tmp_path, teacher_dir, data_dir):
    from canao.models.encoders import load_encoder

    res = run(job(tmp_path, teacher_dir, data_dir, student=None, arch="L2-h4.2-f768", shared_embeddings="minilm",
                  steps=2, eval_every=0), progress=False)
    rec = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert rec["source"] == "teacher slices L2-h4.2-f768.768-s384-fp32" and rec["importance"]["from"] == "computed"
    assert [e["step"] for e in rec["evals"]] == [0, 2] and res["best"]["f1"] >= rec["start_f1"]
    assert rec["repair"]["windows"] > 0 and len(rec["repair"]["unexplained_after"]) == 4  # two blocks per layer
    model, _ = load_encoder(tmp_path / "out" / "model")
    assert model.config.layer_heads == [4, 2] and model.config.layer_ffn == [768, 768]
    with safe_open(str(tmp_path / "out" / "model" / "model.safetensors"), "pt") as f:
        assert not any("word_embeddings" in k for k in f.keys())
    for kw, words in ((dict(arch="L2-h16-f768"), "larger than the teacher"), (dict(arch="L2-h4"), "write it as"),
                      (dict(arch="L2-h4-f768", student="minilm-squad-8x"), "give a trained student .* or an arch"),
                      (dict(student="minilm-squad-8x", shared_embeddings="minilm"), "go with --arch")):
        with pytest.raises(CanaoError, match=words):
            run(job(tmp_path, teacher_dir, data_dir, out=tmp_path / "bad", **{"student": None, **kw}), progress=False)
        assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_distill_cli_refuses_bad_settings(tmp_path, capsys, teacher_dir, data_dir):
    base = ["distill", "--student", "minilm-squad-8x", "--teacher", str(teacher_dir), "--data", str(data_dir),
            "--out", str(tmp_path / "o")]
    for extra, words in ((["--minutes", "0"], "--minutes must be > 0"), (["--steps", "0"], "--steps must be >= 1")):
        assert main(base + extra) == 2
        assert words in capsys.readouterr().err
    assert main(["distill", "--student", str(tmp_path / "nothing"), *base[3:], "--steps", "1"]) == 2
    assert "model not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a refused run leaves nothing behind
