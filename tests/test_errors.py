"""Bad input gets one clear line naming the file or field and the fix, never a traceback."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from canao.errors import CanaoError
from canao.models.encoders import load_encoder


@pytest.fixture
def teacher_copy(teacher_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(teacher_dir, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_corrupt_weights(teacher_copy):
    (teacher_copy / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CanaoError, match="model.safetensors: corrupt or unreadable"):
        load_encoder(teacher_copy)


def test_missing_config(teacher_copy):
    (teacher_copy / "config.json").unlink()
    with pytest.raises(CanaoError, match="no config.json"):
        load_encoder(teacher_copy)


def test_corrupt_config(teacher_copy):
    (teacher_copy / "config.json").write_text("{not json")
    with pytest.raises(CanaoError, match="config.json: not valid JSON"):
        load_encoder(teacher_copy)


def test_pickle_is_refused(teacher_copy):
    (teacher_copy / "model.safetensors").unlink()
    (teacher_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CanaoError, match="pickled checkpoints are refused"):
        load_encoder(teacher_copy)


def test_unknown_architecture(teacher_copy):
    cfg = json.loads((teacher_copy / "config.json").read_text())
    cfg.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
    (teacher_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CanaoError, match="architecture 'T5ForConditionalGeneration'.*not a BERT encoder"):
        load_encoder(teacher_copy)


def test_config_that_does_not_fit_the_weights(teacher_copy):
    cfg = json.loads((teacher_copy / "config.json").read_text())
    cfg.update(hidden_size=768)
    (teacher_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CanaoError, match="hidden_size 768"):
        load_encoder(teacher_copy)


def test_missing_qa_head(teacher_copy):
    from safetensors.torch import load_file, save_file

    state = load_file(str(teacher_copy / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("qa_outputs")}, str(teacher_copy / "model.safetensors"))
    with pytest.raises(CanaoError, match="lack qa_outputs"):
        load_encoder(teacher_copy)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "canao.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    result = _cli("qa", "--model", str(tmp_path / "nowhere"), "--context", "c", "--question", "q")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "model not found" in result.stderr


def test_cli_empty_question(teacher_dir):
    result = _cli("qa", "--model", str(teacher_dir), "--context", "Some passage.", "--question", "", "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert "question is empty" in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_data_folder(teacher_dir):
    env = {"CANAO_DATA": ""}
    result = _cli("eval", "--model", str(teacher_dir), "--task", "squad", env=env)
    assert result.returncode == 2 and "--data" in result.stderr and "Traceback" not in result.stderr


def test_cli_json_is_one_object(teacher_dir):
    result = _cli("qa", "--model", str(teacher_dir), "--context", "Paris is the capital of France.",
                  "--question", "What is the capital of France?", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["answer"] == "Paris" and out["model_ms"] > 0
