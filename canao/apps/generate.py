"""Text generation: prefill the prompt once, then decode one token at a time with the KV cache.

    gen = Generator.load("smollm2", threads=2)
    result = gen.generate("What is the capital of France?", max_new_tokens=64)
    for piece in gen.stream("Tell me a story", temperature=0.7, top_p=0.9, seed=1):
        print(piece, end="", flush=True)

Greedy when temperature == 0; otherwise temperature / top-k / top-p sampling driven by a
seeded torch.Generator, so a seed always reproduces the same text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import CanaoError
from .decoders import load_causal_lm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class _Run:
    """Bookkeeping of one generation, filled in while `_tokens` runs."""

    prompt_tokens: int = 0
    ids: list[int] = field(default_factory=list)
    text: str = ""
    start: float = 0.0
    first: float | None = None  # when the first token was sampled
    end: float = 0.0
    decode_steps: int = 0  # one-token forward passes after the first token
    decode_s: float = 0.0  # their time (the consumer's time between tokens is not counted)
    stop_reason: str = ""

    def result(self) -> dict:
        n = len(self.ids)
        total = self.end - self.start
        ttft = (self.first or self.end) - self.start
        # Decode throughput: one-token steps per second after the first token (prefill excluded).
        rate = self.decode_steps / self.decode_s if self.decode_steps else (n / total if total > 0 else 0.0)
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": n,
            "ttft_ms": ttft * 1000.0,
            "tokens_per_s": rate,
            "total_ms": total * 1000.0,
            "stop_reason": self.stop_reason,
        }


class Generator:
    def __init__(self, model, tokenizer, info: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info or {}

    @classmethod
    def load(cls, model_spec: str, threads: int | None = None, dtype: str = "float32", slots: int = 1) -> "Generator":
        """A GGUF file, a HF folder (llama / gpt2) or a built-in name such as 'smollm2'.

        dtype 'bfloat16' halves the weight bytes read per token (decode is memory-bound on small
        CPUs) at a small accuracy cost; 'float32' is the reference path. slots > 1 (a compiled
        decoder only): that many generations may run at once, from as many threads, their decode
        steps batched (canao.apps.slots)."""
        if threads is not None:
            if threads < 1:
                raise CanaoError(f"threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        if dtype not in DTYPES:
            raise CanaoError(f"dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
        model, tokenizer, info = load_causal_lm(model_spec, threads=threads)
        model.to(DTYPES[dtype])
        info["dtype"] = dtype
        if slots > 1:
            from ..compiler.decoder.decoder_runtime import CompiledCausalLM
            from .slots import SlotLM

            if not isinstance(model, CompiledCausalLM):
                raise CanaoError(f"{slots} concurrent generations need a compiled decoder (canao compile "
                                 f"--model {model_spec}); a PyTorch model runs one at a time")
            model = SlotLM(model.decoder, slots)
        info["slots"] = max(1, slots)
        return cls(model, tokenizer, info)

    @property
    def slots(self) -> int:
        """How many generations may run at once (from as many threads)."""
        return getattr(self.model, "slots", 1)

    @property
    def context_length(self) -> int:
        return self.model.max_seq_len

    def prompt_ids(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        """Token ids fed to the model: the chat template applied (instruct models), or raw text.
        A list of {"role", "content"} messages is a conversation (OpenAI's form), put through the
        chat template with the assistant's turn opened."""
        if isinstance(prompt, list):
            messages = check_messages(prompt)
            if self.tokenizer.has_chat_template:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                ids = self.tokenizer.encode(text, add_special_tokens=False)
            else:  # a base model: the conversation as plain text, ending where the assistant speaks
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
                ids = self.tokenizer.encode(text, add_special_tokens=True)
            return self._fits(ids)
        if not isinstance(prompt, str) or not prompt.strip():
            raise CanaoError("the prompt is empty; give some text to continue or a question to answer")
        if chat and self.tokenizer.has_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            # The template writes its own special tokens, as transformers does when tokenizing a chat.
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        return self._fits(ids)

    def _fits(self, ids: list[int]) -> list[int]:
        window = self.context_length
        if len(ids) >= window:
            raise CanaoError(
                f"the prompt is {len(ids)} tokens but the model's context window is {window}; "
                f"shorten it to fewer than {window} tokens"
            )
        return ids

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, chat: bool = True, stop: str | list[str] | None = None,
                 on_token: Callable[[str], None] | None = None) -> dict:
        """Generate a reply. Returns text, prompt_tokens, generated_tokens, ttft_ms,
        tokens_per_s (decode rate after the first token), total_ms, and stop_reason
        ('eos', 'stop', 'length' or 'context'). on_token receives each text piece as it appears."""
        run = _Run()
        for piece in self._pieces(run, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, stop):
            if on_token is not None:
                on_token(piece)
        return run.result()

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, chat: bool = True, stop: str | list[str] | None = None,
               stats: dict | None = None) -> Iterator[str]:
        """Yield text pieces as they are decoded (whole UTF-8 characters, stop strings withheld).

        Validation errors (empty or over-long prompt, bad settings) are raised at the first next().
        Pass a dict as `stats` to receive generate()'s result fields when the stream ends."""
        run = _Run()
        yield from self._pieces(run, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, stop)
        if stats is not None:
            stats.update(run.result())

    # ------------------------------------------------------------------ internals

    def _pieces(self, run: _Run, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, stop) -> Iterator[str]:
        """Text pieces of one generation; stop strings are held back until they can be ruled out."""
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        if any(not isinstance(s, str) for s in stops):
            raise CanaoError("stop must be a string or a list of strings")
        decoder = self.tokenizer.stream_decoder()
        emitted = 0  # characters of run.text already handed out
        for token_id in self._tokens(run, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat):
            run.text += decoder.step(token_id)
            if stops:
                hit = min((i for i in (run.text.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    run.text = run.text[:hit]
                    run.stop_reason = "stop"
                    if hit > emitted:
                        yield run.text[emitted:]
                    return
                safe = len(run.text) - _partial_stop_suffix(run.text, stops)
            else:
                safe = len(run.text)
            if safe > emitted:
                yield run.text[emitted:safe]
                emitted = safe
        if len(run.text) > emitted:
            yield run.text[emitted:]

    @torch.inference_mode()
    def _tokens(self, run: _Run, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat) -> Iterator[int]:
        """Sampled token ids; sets run.stop_reason when it ends on its own terms."""
        _check_settings(max_new_tokens, temperature, top_k, top_p)
        run.start = time.perf_counter()
        ids = self.prompt_ids(prompt, chat)
        run.prompt_tokens = len(ids)
        budget = min(max_new_tokens, self.context_length - len(ids))
        cache = self.model.new_cache(max_len=len(ids) + budget)
        rng = torch.Generator().manual_seed(int(seed))
        c_state = [int(seed) * 0x9E3779B97F4A7C15 % (1 << 64) or 1]  # a compiled model samples in C
        run.stop_reason = "length" if budget == max_new_tokens else "context"
        try:
            logits = self.model(torch.tensor([ids]), cache, 0, last_only=True)[0, -1]
            pos = len(ids)
            for _ in range(budget):
                if hasattr(self.model, "sample_next"):  # compiled: the logits never leave C
                    token = self.model.sample_next(temperature, top_k, top_p, c_state)
                else:
                    token = _sample(logits, temperature, top_k, top_p, rng)
                now = time.perf_counter()
                if run.first is None:
                    run.first = now
                run.end = now
                if token in self.tokenizer.stop_ids:
                    run.stop_reason = "eos"
                    return
                run.ids.append(token)
                yield token
                if len(run.ids) == budget:
                    break
                step_start = time.perf_counter()
                logits = self.model(torch.tensor([[token]]), cache, pos, last_only=True)[0, -1]
                pos += 1
                run.decode_steps += 1
                run.end = time.perf_counter()
                run.decode_s += run.end - step_start
        finally:
            run.end = time.perf_counter()
            if hasattr(cache, "close"):  # a SlotLM's slot goes back to the other generations
                cache.close()


def _check_settings(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise CanaoError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise CanaoError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise CanaoError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise CanaoError(f"top_p must be in (0, 1], got {top_p}")


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, rng: torch.Generator) -> int:
    """Next token id from last-position logits [vocab]."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng))


CHAT_ROLES = ("system", "user", "assistant")


def check_messages(messages: list) -> list[dict]:
    """A conversation as {"role", "content"} dicts (content: a string, or OpenAI's list of text parts)."""
    if not messages:
        raise CanaoError("the conversation is empty; give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise CanaoError(f"message {i} needs a role, one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise CanaoError(f"message {i}: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise CanaoError(f"message {i}: content must be text")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise CanaoError("every message is empty; give some text to answer")
    return out


def _partial_stop_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


__all__ = ["Generator"]
