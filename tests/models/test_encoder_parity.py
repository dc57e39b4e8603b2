"""Our BERT encoder against transformers on the real weights, and round trips through our own saver."""

import pytest
import torch
import transformers

from canao.models.bert import BertConfig, BertForQuestionAnswering
from canao.models.encoders import load_encoder, save_encoder
from canao.paths import builtin_model

QUESTION = "What did Ada Lovelace write?"
CONTEXT = "Ada Lovelace wrote the first published algorithm, for Babbage's Analytical Engine, in 1843."


def _hf_inputs(folder):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return tok(QUESTION, CONTEXT, return_tensors="pt")


def test_teacher_logits_match_transformers(teacher, teacher_dir):
    model, _ = teacher
    ref = transformers.AutoModelForQuestionAnswering.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    enc = _hf_inputs(teacher_dir)
    with torch.no_grad():
        start, end = model(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        out = ref(**enc)
    assert (start - out.start_logits).abs().max() <= 1e-4
    assert (end - out.end_logits).abs().max() <= 1e-4


def test_padded_batch_matches_single(teacher):
    """Padding must not change the logits of the real tokens (the attention mask works)."""
    model, tok = teacher
    ids = tok.encode(QUESTION, CONTEXT)
    n = len(ids.ids)
    pad = 7
    batch = torch.tensor([ids.ids + [0] * pad]), torch.tensor([ids.type_ids + [0] * pad]), torch.tensor([[1] * n + [0] * pad])
    with torch.no_grad():
        s1, _ = model(torch.tensor([ids.ids]), torch.tensor([ids.type_ids]), torch.ones(1, n, dtype=torch.long))
        s2, _ = model(*batch)
    assert (s1 - s2[:, :n]).abs().max() <= 1e-5


def test_pretrained_minilm_hidden_states_match_transformers():
    base = builtin_model("minilm")
    model, _ = load_encoder(base, task="qa", new_head_ok=True)
    ref = transformers.AutoModel.from_pretrained(base, dtype=torch.float32).eval()
    enc = _hf_inputs(base)
    with torch.no_grad():
        ours = model.bert(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], output_hidden=True)
        theirs = ref(**enc, output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 7
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert (a - b).abs().max() <= 1e-4


def test_uniform_model_saves_in_a_layout_transformers_reads(teacher, teacher_dir, tmp_path):
    model, _ = teacher
    save_encoder(model, tmp_path / "copy", teacher_dir)
    ref = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "copy").eval()
    enc = _hf_inputs(tmp_path / "copy")
    with torch.no_grad():
        start, _ = model(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        assert (start - ref(**enc).start_logits).abs().max() <= 1e-4


def test_per_layer_widths_round_trip(teacher_dir, tmp_path):
    cfg = BertConfig(hidden_size=384, layer_heads=[12, 4, 7], layer_ffn=[1536, 256, 900], head_dim=32)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(cfg).eval()
    save_encoder(model, tmp_path / "slim", teacher_dir)
    loaded, _ = load_encoder(tmp_path / "slim")
    assert loaded.config.layer_heads == [12, 4, 7] and loaded.config.layer_ffn == [1536, 256, 900]
    ids = torch.randint(1000, 2000, (2, 19))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_classification_head_matches_transformers(tmp_path):
    hf_cfg = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=3)
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(hf_cfg).eval()
    ref.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(495)]))
    model, _ = load_encoder(tmp_path, task="classification")
    ids = torch.randint(5, 500, (2, 11))
    with torch.no_grad():
        assert (model(ids) - ref(input_ids=ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("text", ["Héllo, WORLD!  It's 3.14 o'clock—naïve café", "東京 is big", "  spaces\tand\nnewlines  "])
def test_wordpiece_matches_transformers(teacher, teacher_dir, text):
    _, tok = teacher
    ref = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    enc = tok.encode(text, CONTEXT)
    theirs = ref(text, CONTEXT, return_offsets_mapping=True)
    assert enc.ids == theirs["input_ids"]
    assert enc.offsets == [tuple(o) for o in theirs["offset_mapping"]]


def test_vocab_txt_only_tokenizer_matches_tokenizer_json(teacher, teacher_dir, tmp_path):
    from canao.models.wordpiece import load_wordpiece

    (tmp_path / "vocab.txt").write_bytes((teacher_dir / "vocab.txt").read_bytes())
    _, tok = teacher
    assert load_wordpiece(tmp_path).encode(QUESTION, CONTEXT).ids == tok.encode(QUESTION, CONTEXT).ids


def test_sharded_float16_checkpoint_loads(teacher, tmp_path):
    from canao.models.checkpoint import load_state_dict, save_checkpoint

    model, _ = teacher
    state = model.state_dict()
    save_checkpoint(tmp_path, model.config.to_hf(model.architecture), state, dtype=torch.float16, max_shard_bytes=16 << 20)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) == 3
    loaded = load_state_dict(tmp_path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k].half().float()) for k in state)
