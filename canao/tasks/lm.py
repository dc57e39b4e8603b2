"""Language-model perplexity with a sliding window (the Hugging Face recipe).

The text is tokenized once. Windows of `window` tokens start every `stride` tokens; each
window scores only the tokens no earlier window scored, so every token after the first is
predicted exactly once, with between window - stride and window - 1 tokens of context.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CanaoError


def read_text(path: str | Path) -> str:
    """The whole file as UTF-8 text, lines joined as they are; refuses binary or empty files."""
    path = Path(path)
    if not path.is_file():
        raise CanaoError(f"text file not found: {path}")
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CanaoError(f"{path}: looks like a binary file; perplexity needs plain UTF-8 text (e.g. wikitext-2/valid.txt)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanaoError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a plain text file") from None
    if not text.strip():
        raise CanaoError(f"{path}: the file is empty; give a plain text file with some text")
    return text


@torch.inference_mode()
def sliding_window_nll(model, ids: list[int], window: int, stride: int, progress: bool = False) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of tokens scored)."""
    tokens = torch.tensor(ids)
    n = len(ids)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n - 1, desc="perplexity", unit="tok", file=sys.stderr)
    total, scored, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)  # the first target of a window needs one token of context
        logits = model(tokens[None, begin:end])[0].float()
        # logits at position p predict token p + 1
        pred = logits[first - 1 - begin:end - 1 - begin]
        total += F.cross_entropy(pred, tokens[first:end], reduction="sum").item()
        scored += end - first
        if bar is not None:
            bar.update(end - first)
        prev_end = end
        if end == n:
            break
    if bar is not None:
        bar.close()
    return total, scored


def perplexity(model, tokenizer, text_path, window: int = 512, stride: int = 256, max_tokens: int | None = None,
               progress: bool = False, decode_steps: bool = False) -> dict:
    """Perplexity of a causal LM on a text file.

    Returns {"ppl", "tokens" (scored), "window", "stride", "nll" (mean nats per scored token),
    "text_tokens" (tokens in the evaluated text)}. decode_steps (compiled decoders): compute every
    window's logits one token at a time, as generation does (quantized activations included).
    model, tokenizer: as canao.apps.decoders.load_causal_lm gives them (PyTorch or a compiled decoder).
    """
    if window < 2:
        raise CanaoError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise CanaoError(f"stride must be between 1 and the window ({window}), got {stride}")
    if max_tokens is not None and max_tokens < 2:
        raise CanaoError(f"max_tokens must be at least 2, got {max_tokens}")
    text = read_text(text_path)
    if decode_steps and not hasattr(model, "score_by_decode_steps"):
        raise CanaoError("--decode-steps scores a compiled decoder artifact token by token; this model is not one")
    if window > model.max_seq_len:
        raise CanaoError(f"window {window} exceeds the model's context window of {model.max_seq_len}; pass a smaller window")
    ids = tokenizer.encode(text, add_special_tokens=True)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise CanaoError(f"{text_path}: the text is only {len(ids)} token(s); perplexity needs at least 2")
    if decode_steps:  # score through the compiled decode path (one token a step), not the prompt path
        model.score_by_decode_steps = True
    try:
        nll, scored = sliding_window_nll(model, ids, window, stride, progress)
    finally:
        if decode_steps:
            model.score_by_decode_steps = False
    mean = nll / scored
    return {"ppl": math.exp(mean), "tokens": scored, "window": window, "stride": stride, "nll": mean,
            "text_tokens": len(ids)}


__all__ = ["perplexity", "read_text", "sliding_window_nll"]
