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
        result = self.answer_batch([(context, question)])[0]
        if isinstance(result, CanaoError):
            raise result
        return result

    def answer_batch(self, items: list[tuple[str, str]]) -> list[dict | CanaoError]:
        """Answers to several (context, question) pairs, their windows run through the model as one
        batch (padded to the longest window): the server's dynamic batching. An invalid pair gets its
        CanaoError in its place; the others are answered. Stage times are the batch's."""
        out: list = [None] * len(items)
        examples = []
        for i, (context, question) in enumerate(items):
            try:
                _check(context, question)
                examples.append(squad.Example(f"q{i}", question, context, []))
            except CanaoError as exc:
                out[i] = exc
        if not examples:
            return out
        t0 = time.perf_counter()
        feats = squad.make_features(self.engine.tokenizer, examples, self.max_len, self.stride)
        t1 = time.perf_counter()
        start, end = squad.predict(self.engine.run, feats, batch_size=len(feats))
        t2 = time.perf_counter()
        preds = squad.decode_spans(examples, feats, start, end, max_answer_len=self.max_answer_len)
        t3 = time.perf_counter()
        lengths = feats.lengths()
        for j, ex in enumerate(examples):
            pred, mine = preds[ex.qid], feats.example_index == j
            out[int(ex.qid[1:])] = {
                "answer": pred["text"],
                "start_char": pred["start_char"],
                "end_char": pred["end_char"],
                "score": pred["score"],
                "tokens": int(lengths[mine].sum()),
                "windows": int(mine.sum()),
                "batch": len(examples),
                "tokenize_ms": (t1 - t0) * 1e3,
                "model_ms": (t2 - t1) * 1e3,
                "decode_ms": (t3 - t2) * 1e3,
                "total_ms": (t3 - t0) * 1e3,
            }
        return out


def _check(context: str, question: str) -> None:
    if not isinstance(context, str) or not context.strip():
        raise CanaoError("the context is empty: give the passage to answer from")
    if not isinstance(question, str) or not question.strip():
        raise CanaoError("the question is empty: ask something about the passage")
    if len(context) > MAX_CONTEXT_CHARS:
        raise CanaoError(f"the context has {len(context)} characters; the limit is {MAX_CONTEXT_CHARS}: shorten it")
    if len(question) > MAX_QUESTION_CHARS:
        raise CanaoError(f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
