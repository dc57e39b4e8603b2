"""The shipped QA students: load by name, small files, F1 on a fixed dev slice, compiled by default for serve."""

import json

import pytest

from canao.apps.zoo import STUDENTS, compiled_student
from canao.models.encoders import SHARED_TABLE, load_encoder
from canao.paths import resolve_model_path
from canao.tasks import squad

# F1 floors on the first 200 dev questions (PyTorch, fp16 weights): the measured figure minus 2
# points of slack for numeric differences between machines; the teacher scores 74.1 there.
FLOORS = {"minilm-squad-4x": 77.2, "minilm-squad-8x": 72.6}  # measured 79.20 and 74.62


@pytest.mark.parametrize("name", STUDENTS)
def test_student_loads_by_name_is_small_and_keeps_its_f1(name, data_dir):
    folder = resolve_model_path(name)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert weights < 15 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config[SHARED_TABLE]["model"] == "minilm"  # the table comes from the installed all-MiniLM-L6-v2
    model, tok = load_encoder(folder)
    dev = squad.read_squad(data_dir / "squad" / "dev-v1.1.json", 200)

    import torch

    @torch.no_grad()
    def run(ids, tt, mask):
        s, e = model(*[torch.as_tensor(a) for a in (ids, tt, mask)])
        return s.numpy(), e.numpy()

    f1 = squad.evaluate(run, tok, dev)["f1"]
    assert f1 >= FLOORS[name], f"{name}: F1 {f1:.2f} on 200 dev questions, floor {FLOORS[name]}"


# the same slice through the compiled int8 artifact (int8 GEMMs and int8 attention): measured minus 2
COMPILED_FLOORS = {"minilm-squad-4x": 75.9, "minilm-squad-8x": 72.3}  # measured 77.92 and 74.34


@pytest.mark.parametrize("name", STUDENTS)
def test_compiled_student_keeps_its_f1(name, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CANAO_CACHE", str(tmp_path))
    from canao.compress.oracle import artifact_runner

    art = compiled_student(name, threads=1)
    assert json.loads((art / "manifest.json").read_text())["attention"] == "int8"
    _, tok = load_encoder(resolve_model_path(name))
    run, close = artifact_runner(art, 1)
    try:
        f1 = squad.evaluate(run, tok, squad.read_squad(data_dir / "squad" / "dev-v1.1.json", 200))["f1"]
    finally:
        close()
    assert f1 >= COMPILED_FLOORS[name], f"{name} compiled: F1 {f1:.2f} on 200 dev questions, floor {COMPILED_FLOORS[name]}"


def test_serve_default_is_the_compiled_4x_student(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("CANAO_CACHE", str(tmp_path))
    from canao.apps.qa import QAPipeline
    from canao.serve.command import default_models

    qa, lm = default_models(threads=1)
    assert qa[0].startswith("minilm-squad-4x=") and lm[0].startswith("smollm2=")
    from canao.apps.generate import Generator

    gen = Generator.load(lm[0].split("=", 1)[1], threads=1)  # SmolLM2 compiled from its Q4_1 GGUF, cached
    assert gen.info["format"] == "canao-artifact" and gen.info["precision"] == "q4_1"
    assert gen.generate("Say hi.", max_new_tokens=3)["generated_tokens"] >= 1
    path = qa[0].split("=", 1)[1]
    assert compiled_student("minilm-squad-4x", threads=1) == type(compiled_student("minilm-squad-4x"))(path)  # cached
    pipe = QAPipeline.load(path)
    assert pipe.info["engine"] == "canao" and pipe.info["precision"] == "int8"
    ans = pipe.answer("The Analytical Engine was designed by Charles Babbage. Ada Lovelace published the first "
                      "algorithm for it in 1843.", "Who published the first algorithm for the Analytical Engine?")
    assert "Lovelace" in ans["answer"]


def test_cli_answers_with_a_shipped_student(capsys):
    from canao.cli import main

    assert main(["qa", "--model", "minilm-squad-8x", "--context", "Paris is the capital of France.",
                 "--question", "What is the capital of France?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == "Paris"
