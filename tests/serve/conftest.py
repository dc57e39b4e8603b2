"""Fixtures for the demo server: real models loaded once per session, one app over them.

The TestClient is used without its context manager (no lifespan), so the API tests,
the live uvicorn server and the browser test all share one app and one worker (one
lock) per model: a model is never called from two threads at once.
"""

from __future__ import annotations

import pytest

import starlette  # noqa: F401  (the serve extra; a missing one must fail, not skip)
import uvicorn  # noqa: F401

from serve_helpers import CONTEXT, GEN_TOKENS, PROMPT, QUESTION


@pytest.fixture(scope="session")
def qa_pipeline(teacher_dir):
    from canao.apps.qa import QAPipeline

    return QAPipeline.load(str(teacher_dir))


@pytest.fixture(scope="session")
def qa_pipeline_b():
    """The second QA model (the page's model switch): the shipped 4x student compiled to int8, on
    canao's runtime, as `canao serve` serves it by default."""
    from canao.apps.qa import QAPipeline
    from canao.apps.zoo import compiled_student

    return QAPipeline.load(str(compiled_student("minilm-squad-4x", threads=1)), threads=1)


@pytest.fixture(scope="session")
def generator():
    """SmolLM2 compiled from its Q4_1 GGUF (cached), as `canao serve` serves it by default."""
    from canao.apps.generate import Generator
    from canao.apps.zoo import compiled_decoder

    return Generator.load(str(compiled_decoder("smollm2")), threads=1)


@pytest.fixture(scope="session")
def qa_reference(qa_pipeline) -> dict:
    return qa_pipeline.answer(CONTEXT, QUESTION)


@pytest.fixture(scope="session")
def gen_reference(generator) -> dict:
    return generator.generate(PROMPT, max_new_tokens=GEN_TOKENS)


@pytest.fixture(scope="session")
def app(qa_pipeline, qa_pipeline_b, generator):
    from canao.serve import Limits, create_app

    return create_app({"teacher": qa_pipeline, "student-4x": qa_pipeline_b}, {"smollm2": generator},
                      Limits(max_new_tokens=64, max_context_chars=5_000, max_prompt_chars=1_000))


@pytest.fixture(scope="session")
def client(app):
    from starlette.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="session")
def live_url(app):
    """The same app under a real uvicorn on 127.0.0.1 (a free port), in a background thread."""
    from canao.serve.live import BackgroundServer

    with BackgroundServer(app) as url:
        yield url
