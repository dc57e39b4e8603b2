"""The tokenizer rebuilt from SmolLM2's GGUF metadata against transformers' GGUF tokenizer."""

import pytest

from canao.errors import CanaoError
from canao.models.bpe_tokenizer import BPETokenizer
from canao.models.gguf_loader import GGUFFile, open_gguf
from canao.paths import builtin_model

import transformers

SAMPLES = [
    "Hello world",
    " Hello  world!\n\n  indented\tline",
    "The year 2024 had 366 days; pi = 3.14159 and 1,000,000 > 999.",
    "naïve café — Ünïcödé 日本語 한국어 😀👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n\treturn x**2  # squares\n",
    "I'm sure you're right, they'll say DON'T.",
    "<|endoftext|>after the end",
]


@pytest.fixture(scope="module")
def gguf_file():
    return open_gguf(builtin_model("smollm2"))


@pytest.fixture(scope="module")
def ours(gguf_file):
    return BPETokenizer.from_gguf(gguf_file)


@pytest.fixture(scope="module")
def reference():
    path = builtin_model("smollm2")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", SAMPLES)
def test_ids_match_transformers(ours, reference, text):
    assert ours.encode(text) == reference(text)["input_ids"]


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trip(ours, text):
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_special_tokens(ours):
    assert (ours.bos_id, ours.eos_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert ours.encode("<|im_end|>") == [2]  # control tokens stay whole
    assert {0, 2} <= ours.stop_ids  # <|endoftext|> and <|im_end|> both end a generation
    assert ours.decode([1, 28120, 2]) == ours.decode([28120])  # special tokens skipped by default


@pytest.mark.parametrize("messages, add_generation_prompt", [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a color."}], True),
    ([{"role": "user", "content": "ünïcode ✓"}, {"role": "assistant", "content": "ok"}], False),
])
def test_chat_template_matches_transformers(ours, reference, messages, add_generation_prompt):
    want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


def test_stream_decoder_keeps_multibyte_characters_whole(ours):
    text = "Emoji 😀 and 日本語 split across byte-level tokens"
    stream = ours.stream_decoder()
    pieces = [stream.step(i) for i in ours.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_unsupported_tokenizer_is_refused(gguf_file):
    sentencepiece = GGUFFile(gguf_file.path, dict(gguf_file.metadata, **{"tokenizer.ggml.model": "llama"}), {})
    with pytest.raises(CanaoError, match="tokenizer type 'llama'"):
        BPETokenizer.from_gguf(sentencepiece)
    unknown_pre = GGUFFile(gguf_file.path, dict(gguf_file.metadata, **{"tokenizer.ggml.pre": "no-such-pre"}), {})
    with pytest.raises(CanaoError, match="no-such-pre"):
        BPETokenizer.from_gguf(unknown_pre)
