"""SQuAD v1.1: reading, windowed features, span decoding and the official EM/F1."""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import CanaoError


@dataclass
class Example:
    qid: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int] = field(default_factory=list)


def read_squad(path: str | Path, limit: int | None = None) -> list[Example]:
    """Questions in file order (the first `limit` of them). Fields are checked so a file
    in another format fails with the field that is wrong, not a KeyError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CanaoError(f"SQuAD file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CanaoError(f"{path}: not a SQuAD JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise CanaoError(f"{path}: expected SQuAD v1.1 format, a JSON object with a 'data' list of articles")
    examples: list[Example] = []
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) or not isinstance(para.get("qas"), list):
                raise CanaoError(f"{where}: needs a 'context' string and a 'qas' list")
            for q, qa in enumerate(para["qas"]):
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or "id" not in qa:
                    raise CanaoError(f"{where}.qas[{q}]: needs 'id' and 'question'")
                answers = qa.get("answers", [])
                if qa.get("is_impossible") or not answers:
                    continue  # v2.0 unanswerable questions are outside v1.1's task
                try:
                    texts = [ans["text"] for ans in answers]
                    starts = [int(ans["answer_start"]) for ans in answers]
                except (KeyError, TypeError, ValueError):
                    raise CanaoError(f"{where}.qas[{q}].answers: each answer needs 'text' and 'answer_start'") from None
                examples.append(Example(str(qa["id"]), qa["question"], para["context"], texts, starts))
                if limit is not None and len(examples) >= limit:
                    return examples
    if not examples:
        raise CanaoError(f"{path}: no answerable questions found")
    return examples


@dataclass
class Features:
    """Windows over the contexts: one row per window, padded to the longest window."""

    input_ids: np.ndarray  # (n, L) int64
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    example_index: np.ndarray  # (n,) which example each window belongs to
    offsets: list[list[tuple[int, int] | None]]  # char span per token; None outside the context
    start_positions: np.ndarray | None = None  # training labels (0 = [CLS] when not in window)
    end_positions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.example_index)

    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(1)


def _configure(tok: Tokenizer, max_len: int, stride: int, max_query_tokens: int) -> Tokenizer:
    if max_len > 512:
        raise CanaoError(f"max length {max_len} exceeds the encoder's 512 positions")
    room = max_len - max_query_tokens - 3  # [CLS] question [SEP] context [SEP]
    if room < 2:
        raise CanaoError(f"max length {max_len} leaves no room for the context beside a question of up to "
                         f"{max_query_tokens} tokens; use a model or artifact with a max length of at least "
                         f"{max_query_tokens + 5}")
    if not 0 <= stride < room:
        raise CanaoError(f"doc stride {stride} must be below {room} for max length {max_len} "
                         f"(the windows must advance past a {max_query_tokens}-token question)")
    tok.enable_truncation(max_len, stride=stride, strategy="only_second")
    tok.no_padding()
    return tok


def make_features(tok: Tokenizer, examples: list[Example], max_len: int = 384, stride: int = 128,
                  with_labels: bool = False, max_query_tokens: int = 64) -> Features:
    """Tokenize (question, context) pairs into overlapping windows of at most max_len
    tokens; `stride` tokens of context overlap between windows (Hugging Face's convention)."""
    # Very long questions would leave no room for context; cap them as BERT's SQuAD recipe does.
    questions = []
    for ex in examples:
        q_ids = tok.encode(ex.question.lstrip(), add_special_tokens=False)
        questions.append(ex.question.lstrip() if len(q_ids) <= max_query_tokens
                         else ex.question.lstrip()[: q_ids.offsets[max_query_tokens - 1][1]])
    _configure(tok, max_len, stride, max_query_tokens)
    try:
        encodings = tok.encode_batch(list(zip(questions, [ex.context for ex in examples])))
    finally:
        tok.no_truncation()
    rows, ex_index, offsets, starts, ends = [], [], [], [], []
    for i, enc in enumerate(encodings):
        for window in [enc, *enc.overflowing]:
            seq_ids = window.sequence_ids
            offs = [o if s == 1 else None for o, s in zip(window.offsets, seq_ids)]
            rows.append((window.ids, window.type_ids))
            ex_index.append(i)
            offsets.append(offs)
            if with_labels:
                s, e = _label(examples[i], offs)
                starts.append(s)
                ends.append(e)
    longest = max(len(ids) for ids, _ in rows)
    n = len(rows)
    input_ids = np.zeros((n, longest), np.int64)
    type_ids = np.zeros((n, longest), np.int64)
    mask = np.zeros((n, longest), np.int64)
    for r, (ids, types) in enumerate(rows):
        input_ids[r, : len(ids)] = ids
        type_ids[r, : len(ids)] = types
        mask[r, : len(ids)] = 1
    return Features(input_ids, type_ids, mask, np.array(ex_index), offsets,
                    np.array(starts) if with_labels else None, np.array(ends) if with_labels else None)


def _label(ex: Example, offs: list[tuple[int, int] | None]) -> tuple[int, int]:
    """Token start/end of the first gold answer in this window, or (0, 0) if it is not inside."""
    a_start = ex.answer_starts[0]
    a_end = a_start + len(ex.answers[0])
    ctx = [i for i, o in enumerate(offs) if o is not None]
    if not ctx or offs[ctx[0]][0] > a_start or offs[ctx[-1]][1] < a_end:
        return 0, 0
    start = next(i for i in ctx if offs[i][1] > a_start)
    end = next(i for i in reversed(ctx) if offs[i][0] < a_end)
    return start, end


def decode_spans(examples: list[Example], features: Features, start_logits: np.ndarray, end_logits: np.ndarray,
                 n_best: int = 20, max_answer_len: int = 30) -> dict[str, dict]:
    """Best span per question over all its windows: the n_best start and end candidates of
    each window, spans inside the context only, at most max_answer_len tokens."""
    best: dict[int, tuple[float, int, int]] = {}
    for f in range(len(features)):
        offs = features.offsets[f]
        s_log, e_log = start_logits[f], end_logits[f]
        length = len(offs)
        s_top = np.argsort(s_log[:length])[::-1][:n_best]
        e_top = np.argsort(e_log[:length])[::-1][:n_best]
        ex = int(features.example_index[f])
        for s in s_top:
            if offs[s] is None:
                continue
            for e in e_top:
                if offs[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                score = float(s_log[s] + e_log[e])
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, offs[s][0], offs[e][1])
    out = {}
    for i, ex in enumerate(examples):
        score, a, b = best.get(i, (float("-inf"), 0, 0))
        out[ex.qid] = {"text": ex.context[a:b], "start_char": a, "end_char": b, "score": score}
    return out


# The official SQuAD v1.1 evaluation, as in its evaluate-v1.1.py.
def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_metrics(examples: list[Example], predictions: dict[str, dict | str]) -> dict[str, float]:
    """EM and F1 as percentages, each the max over the gold answers, averaged over questions."""
    em = f1 = 0.0
    for ex in examples:
        pred = predictions[ex.qid]
        text = pred["text"] if isinstance(pred, dict) else pred
        em += max(exact_match(text, g) for g in ex.answers)
        f1 += max(f1_score(text, g) for g in ex.answers)
    n = len(examples)
    return {"em": 100.0 * em / n, "f1": 100.0 * f1 / n, "questions": n}


def predict(run, features: Features, batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits for every window. `run(ids, types, mask) -> (start, end)` is any
    engine; windows are batched by similar length and each batch is cut to its longest
    window, so short inputs cost what short inputs cost."""
    from tqdm import tqdm

    n, width = features.input_ids.shape
    start = np.full((n, width), -1e9, np.float32)
    end = np.full((n, width), -1e9, np.float32)
    order = np.argsort(features.lengths(), kind="stable")
    batches = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    for idx in tqdm(batches, desc="squad", unit="batch", disable=not progress, file=None):
        length = int(features.lengths()[idx].max())
        s, e = run(features.input_ids[idx, :length], features.token_type_ids[idx, :length], features.attention_mask[idx, :length])
        start[idx, :length] = s
        end[idx, :length] = e
    return start, end


def score(run, examples: list[Example], features: Features, batch_size: int = 32,
          progress: bool = False) -> tuple[dict[str, float], dict]:
    """(EM/F1 metrics, predictions) of `run` on windows already made by make_features."""
    s, e = predict(run, features, batch_size, progress)
    preds = decode_spans(examples, features, s, e)
    return squad_metrics(examples, preds), preds


def evaluate(run, tok: Tokenizer, examples: list[Example], max_len: int = 384, stride: int = 128,
             batch_size: int = 32, progress: bool = False) -> dict:
    feats = make_features(tok, examples, max_len, stride)
    metrics, preds = score(run, examples, feats, batch_size, progress)
    return {**metrics, "windows": len(feats), "max_len": max_len, "stride": stride, "predictions": preds}
