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
    from canao.apps.commands import _squad_eval

    with pytest.raises(CanaoError, match="at most 128 tokens"):
        _squad_eval(str(artifact), data_dir / "squad" / "dev-v1.1.json", 2, 384, 128, 8)
