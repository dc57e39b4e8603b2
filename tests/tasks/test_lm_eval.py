"""WikiText-2 perplexity of SmolLM2 with the sliding-window recipe."""

import math

import pytest

from canao.errors import CanaoError
from canao.tasks.lm import perplexity

# Measured with window 512 / stride 256 on the first 1024 tokens of valid.txt: 14.23
# (float32, SmolLM2-135M-Instruct Q4_1). A loading or scoring regression lands far above.
PPL_CEILING = 15.7


@pytest.fixture(scope="module")
def smollm2():
    from canao.apps.decoders import load_causal_lm

    model, tokenizer, _ = load_causal_lm("smollm2")
    return model, tokenizer


@pytest.fixture(scope="module")
def wikitext(data_dir):
    return data_dir / "wikitext-2" / "valid.txt"


def test_smollm2_perplexity_on_wikitext2(smollm2, wikitext):
    result = perplexity(*smollm2, wikitext, window=512, stride=256, max_tokens=1024)
    assert result["text_tokens"] == 1024
    assert result["tokens"] == 1023  # every token after the first scored exactly once
    assert (result["window"], result["stride"]) == (512, 256)
    assert math.isfinite(result["ppl"]) and 5.0 < result["ppl"] < PPL_CEILING
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))


@pytest.mark.parametrize("content", [b"", b"   \n\n", b"\x00\x01GGUF\x00binary" * 100, b"\xff\xfe\xfa not utf-8"])
def test_wrong_file_format_is_refused(smollm2, tmp_path, content):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(CanaoError, match="data.txt"):
        perplexity(*smollm2, path, max_tokens=64)


def test_bad_window_settings_are_refused(smollm2, wikitext):
    with pytest.raises(CanaoError, match="stride"):
        perplexity(*smollm2, wikitext, window=128, stride=256)
