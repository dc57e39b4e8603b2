"""The QA app and SQuAD evaluation run a compiled artifact through the same engine interface."""

import numpy as np
import pytest

from canao.apps.engine import ArtifactQAEngine, load_qa_engine
from canao.apps.qa import QAPipeline
from canao.cli import main
from canao.errors import CanaoError
from canao.tasks import squad


@pytest.fixture(scope="module")
def artifact(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "teacher-128"
    assert main(["compile", "--model", str(teacher_dir), "--out", str(out), "--max-seq", "128", "--threads", "1"]) == 0
    return out


def test_artifact_matches_pytorch_on_real_questions(artifact, teacher_dir, data_dir):
    compiled, torch_engine = load_qa_engine(str(artifact), threads=1), load_qa_engine(str(teacher_dir))
    assert isinstance(compiled, ArtifactQAEngine) and compiled.info["max_seq"] == 128
    examples = squad.read_squad(data_dir / "squad" / "dev-v1.1.json", limit=12)
    feats = squad.make_features(compiled.tokenizer, examples, max_len=128, stride=32)
    a = squad.predict(compiled.run, feats)
    b = squad.predict(torch_engine.run, feats)
    real = feats.attention_mask.astype(bool)
    assert np.abs(a[0] - b[0])[real].max() <= 1e-4
    assert np.abs(a[1] - b[1])[real].max() <= 1e-4


def test_qa_pipeline_on_artifact(artifact):
    qa = QAPipeline.load(str(artifact))
    assert qa.max_len == 128 and qa.info["engine"] == "canao"
    result = qa.answer("The Eiffel Tower was completed in 1889 and stands in Paris.", "When was the Eiffel Tower completed?")
    assert result["answer"] == "1889"


def test_eval_refuses_windows_longer_than_the_artifact(artifact, data_dir):
    from canao.apps.command import _squad_eval

    with pytest.raises(CanaoError, match="at most 128 tokens"):
        _squad_eval(str(artifact), data_dir / "squad" / "dev-v1.1.json", 2, 384, 128, 8)


def test_threads_flag_reaches_the_compiled_runtime(artifact, data_dir, capsys, pools_opened):
    """`--threads` of canao qa / eval / serve opens the artifact's thread pool with that many threads
    (it used to be dropped on the way: the artifact's own setting applied)."""
    import json

    from canao.compiler.encoder_runtime import CompiledModel

    opened = pools_opened(CompiledModel)
    for threads in ("1", "2"):
        assert main(["qa", "--model", str(artifact), "--context", "Paris is in France.", "--question",
                     "Where is Paris?", "--threads", threads, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["model"]["threads"] == int(threads)
    assert main(["eval", "--model", str(artifact), "--task", "squad", "--data", str(data_dir), "--limit", "2",
                 "--max-len", "128", "--stride", "32", "--threads", "2", "--json"]) == 0
    capsys.readouterr()
    from canao.serve.command import load_models

    qa, _ = load_models([str(artifact)], [], threads=1, quiet=True)
    assert opened == [1, 2, 2, 1] and next(iter(qa.values())).info["threads"] == 1


def test_cli_x86_64_int8_artifact_answers_and_reports_the_build_it_runs(teacher_dir, tmp_path, capsys):
    """`canao compile --target x86-64` ships every x86 build in one folder (tokenizer once, at the top);
    `canao qa` on it runs the build this CPU picks, with the int8 attention the int8 model defaults to."""
    import json

    from canao.compiler.targets import host_target

    out = tmp_path / "teacher-x86-64"
    assert main(["compile", "--model", str(teacher_dir), "--out", str(out), "--max-seq", "128", "--precision", "int8",
                 "--target", "x86-64", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"]["name"] == "x86-64" and summary["attention"] == "int8"
    assert (out / "vocab.txt").is_file() and not (out / host_target().name / "vocab.txt").exists()
    assert main(["qa", "--model", str(out), "--context", "The Eiffel Tower was completed in 1889 and stands in Paris.",
                 "--question", "When was the Eiffel Tower completed?", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] == "1889" and result["model"]["target"] == host_target().name
