"""canao serve's OpenAI-compatible API, driven by the official `openai` client against a real server
on 127.0.0.1: chat and text completions, streaming and not, usage, seeds, stops and the errors."""

from __future__ import annotations

import openai
import pytest

from serve_helpers import PROMPT


@pytest.fixture(scope="module")
def oai(live_url):
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_generation_models(oai):
    assert [m.id for m in oai.models.list()] == ["smollm2"]


def test_chat_completion_equals_the_generator_through_the_chat_template(oai, generator):
    """Greedy (temperature 0) through the API: the same text as the generator given the same conversation."""
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": PROMPT}]
    ref = generator.generate(messages, max_new_tokens=24, temperature=0.0)
    out = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "smollm2"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert choice.finish_reason == ("length" if ref["stop_reason"] in ("length", "context") else "stop")
    assert out.usage.prompt_tokens == ref["prompt_tokens"] and out.usage.completion_tokens == ref["generated_tokens"]
    assert out.usage.total_tokens == ref["prompt_tokens"] + ref["generated_tokens"]


def test_streamed_chat_is_the_same_text_in_chunks_with_usage(oai):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0.7, seed=5)
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # same seed, same sample
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_text_completion_with_a_stop_string(oai, generator):
    prompt = "The capital of France is"
    ref = generator.generate(prompt, max_new_tokens=20, temperature=0.0, chat=False)
    out = oai.completions.create(model="smollm2", prompt=prompt, max_tokens=20, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == ref["text"]
    stop = ref["text"].strip()[:3]
    cut = oai.completions.create(model="smollm2", prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in oai.completions.create(model="smollm2", prompt=prompt,
                                                                           max_tokens=20, temperature=0, stream=True))
    assert streamed == ref["text"]


def test_errors_come_in_openai_shape(oai):
    with pytest.raises(openai.NotFoundError, match="The model 'gpt-4o' does not exist"):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="'n' is not supported"):
        oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="role"):
        oai.chat.completions.create(model="smollm2", messages=[{"role": "wizard", "content": "hi"}])
    try:
        oai.chat.completions.create(model="smollm2", messages=[])
    except openai.BadRequestError as exc:
        assert exc.body["code"] == "invalid_messages" and exc.body["type"] == "invalid_request_error"
    else:
        raise AssertionError("an empty conversation was accepted")
