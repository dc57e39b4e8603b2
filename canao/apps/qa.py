"""Extractive question answering on one passage, with the time of each stage."""

from __future__ import annotations

import time

from ..errors import CanaoError
from ..tasks import squad
from .engine import load_qa_engine

MAX_CONTEXT_CHARS = 100_000  # about 25k tokens: ~100 windows, still interactive
MAX_QUESTION_CHARS = 1_000


class QAPipeline:
    def __init__(self, engine, max_len: int = 384, stride: int = 128, max_answer_len: int = 30):
        self.engine = engine
        self.max_len, self.stride, self.max_answer_len = max_len, stride, max_answer_len

    @classmethod
    def load(cls, spec: str, threads: int | None = None, **kw) -> "QAPipeline":
        """threads: the compiled runtime's thread count (default: the artifact's; PyTorch keeps its own)."""
        engine = load_qa_engine(spec, threads)
        kw.setdefault("max_len", min(384, int(engine.info["max_seq"])))  # an artifact may be built for less
        kw.setdefault("stride", min(128, kw["max_len"] // 4))
        pipeline = cls(engine, **kw)
        pipeline.answer("canao warms up its kernels here.", "What warms up?")  # first call pays one-off set-up
        return pipeline

    @property
    def info(self) -> dict:
        return self.engine.info

    def answer(self, context: str, question: str) -> dict:
        if not context or not context.strip():
            raise CanaoError("the context is empty: give the passage to answer from")
        if not question or not question.strip():
            raise CanaoError("the question is empty: ask something about the passage")
        if len(context) > MAX_CONTEXT_CHARS:
            raise CanaoError(f"the context has {len(context)} characters; the limit is {MAX_CONTEXT_CHARS}: shorten it")
        if len(question) > MAX_QUESTION_CHARS:
            raise CanaoError(f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
        example = squad.Example("q", question, context, [])
        t0 = time.perf_counter()
        feats = squad.make_features(self.engine.tokenizer, [example], self.max_len, self.stride)
        t1 = time.perf_counter()
        start, end = squad.predict(self.engine.run, feats, batch_size=len(feats))
        t2 = time.perf_counter()
        pred = squad.decode_spans([example], feats, start, end, max_answer_len=self.max_answer_len)["q"]
        t3 = time.perf_counter()
        return {
            "answer": pred["text"],
            "start_char": pred["start_char"],
            "end_char": pred["end_char"],
            "score": pred["score"],
            "tokens": int(feats.lengths().sum()),
            "windows": len(feats),
            "tokenize_ms": (t1 - t0) * 1e3,
            "model_ms": (t2 - t1) * 1e3,
            "decode_ms": (t3 - t2) * 1e3,
            "total_ms": (t3 - t0) * 1e3,
        }
