"""SQuAD: the official metric, windowing, and F1 of the reference teacher on a fixed dev slice."""

import json

import pytest

from canao.apps.engine import load_qa_engine
from canao.apps.qa import QAPipeline
from canao.errors import CanaoError
from canao.tasks import squad


@pytest.mark.parametrize("pred,gold,em,f1", [
    ("The Normans", "Normans", 1.0, 1.0),          # articles and case are ignored
    ("in 1843.", "1843", 0.0, 2 / 3),              # punctuation dropped, 'in' costs precision
    ("Denver Broncos", "the Denver Broncos!", 1.0, 1.0),
    ("Carolina", "Denver Broncos", 0.0, 0.0),
])
def test_official_normalisation(pred, gold, em, f1):
    assert squad.exact_match(pred, gold) == em
    assert squad.f1_score(pred, gold) == pytest.approx(f1)


def test_long_context_is_windowed_and_labels_point_at_the_answer(teacher, data_dir):
    _, tok = teacher
    examples = squad.read_squad(data_dir / "squad" / "train-subset-v1.1.json", limit=200)
    feats = squad.make_features(tok, examples, max_len=128, stride=32, with_labels=True)
    assert len(feats) > len(examples)  # long paragraphs need several windows
    assert feats.input_ids.shape[1] <= 128
    labelled = 0
    for f in range(len(feats)):
        s, e = feats.start_positions[f], feats.end_positions[f]
        if s == 0:
            continue
        ex = examples[feats.example_index[f]]
        offs = feats.offsets[f]
        assert squad.normalize_answer(ex.context[offs[s][0]:offs[e][1]]) == squad.normalize_answer(ex.answers[0])
        labelled += 1
    assert labelled >= len(examples)  # every answer lies in at least one window


def test_teacher_f1_on_fixed_dev_slice(teacher_dir, data_dir):
    """First 150 dev questions, fp32 at max length 384 / stride 128: measured EM 67.3, F1 74.9."""
    engine = load_qa_engine(str(teacher_dir))
    examples = squad.read_squad(data_dir / "squad" / "dev-v1.1.json", limit=150)
    result = squad.evaluate(engine.run, engine.tokenizer, examples)
    assert result["f1"] >= 73.5
    assert result["em"] >= 65.0


def test_qa_pipeline_answers_and_times_each_stage(teacher_dir):
    qa = QAPipeline.load(str(teacher_dir))
    context = "The Eiffel Tower was completed in 1889 and is 330 metres tall. It stands in Paris."
    result = qa.answer(context, "When was the Eiffel Tower completed?")
    assert result["answer"] == "1889"
    assert context[result["start_char"]:result["end_char"]] == "1889"
    assert all(result[k] > 0 for k in ("tokenize_ms", "model_ms", "decode_ms"))
    with pytest.raises(CanaoError, match="question is empty"):
        qa.answer(context, "  ")
    with pytest.raises(CanaoError, match="context is empty"):
        qa.answer("", "Where?")


def test_answer_in_a_late_window_is_found(teacher_dir):
    """A passage much longer than one window: the answer is near its end."""
    qa = QAPipeline.load(str(teacher_dir))
    filler = " ".join(f"Sentence number {i} talks about nothing in particular." for i in range(120))
    context = filler + " The secret vault was opened by Marie Curie in Warsaw."
    result = qa.answer(context, "Who opened the secret vault?")
    assert result["windows"] > 2
    assert result["answer"] == "Marie Curie"


@pytest.mark.parametrize("content,match", [
    ("not json at all", "not a SQuAD JSON file"),
    (json.dumps({"version": "1.1"}), "'data' list"),
    (json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}), r"paragraphs\[0\]: needs a 'context'"),
    (json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", "answers": [{"text": "c"}]}]}]}]}),
     "answer_start"),
])
def test_wrong_format_names_the_field(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CanaoError, match=match):
        squad.read_squad(path)


def test_window_settings_that_cannot_fit_a_context_are_named(teacher):
    _, tok = teacher
    with pytest.raises(CanaoError, match="max length 64 leaves no room for the context"):
        squad.make_features(tok, [], max_len=64, stride=16)
    with pytest.raises(CanaoError, match="doc stride 100 must be below 61"):
        squad.make_features(tok, [], max_len=128, stride=100)
