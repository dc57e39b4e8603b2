"""Byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM...) and chat templates.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges, token types and special
ids as metadata, plus `tokenizer.ggml.pre` naming the pre-tokenizer (the regex that splits text
before BPE). We rebuild an equivalent Hugging Face `tokenizers.Tokenizer` from those, using
llama.cpp's pre-tokenizer definitions. A Hugging Face folder brings its own tokenizer.json.

Chat templates are Jinja2, rendered in a sandbox the way transformers renders them.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.decoders import DecodeStream

from ..errors import CanaoError

# GGUF token types (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4

# Tokens that end a generation when a vocabulary has them, besides its eos id (as llama.cpp does).
END_OF_GENERATION = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "</s>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre():
    # The GPT-2 regex is built into ByteLevel(use_regex=True).
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre():
    # llama.cpp's STARCODER/SMOLLM: every digit is its own piece, then the GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _split_pre(regex: str):
    def build():
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return build


# tokenizer.ggml.pre -> pre-tokenizer builder (names and regexes from llama.cpp's llama-vocab.cpp).
PRE_TOKENIZERS = {
    "default": _gpt2_pre, "gpt2": _gpt2_pre, "gpt-2": _gpt2_pre, "mpt": _gpt2_pre, "olmo": _gpt2_pre, "jais": _gpt2_pre,
    "smollm": _digits_then_gpt2_pre, "starcoder": _digits_then_gpt2_pre, "refact": _digits_then_gpt2_pre,
    "codeshell": _digits_then_gpt2_pre,
    "llama3": _split_pre(_LLAMA3_SPLIT), "llama-bpe": _split_pre(_LLAMA3_SPLIT), "llama-v3": _split_pre(_LLAMA3_SPLIT),
    "smaug-bpe": _split_pre(_LLAMA3_SPLIT), "dbrx": _split_pre(_LLAMA3_SPLIT),
    "qwen2": _split_pre(_QWEN2_SPLIT),
}
# Llama-3-style vocabularies look a piece up whole before merging (tokenizer.json "ignore_merges").
IGNORE_MERGES = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx"}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class BPETokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs: special ids, stop ids, chat template."""

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 chat_template: str | None = None, source: str = ""):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template or None
        self.source = source
        stops = {eos_id} if eos_id is not None else set()
        for text in END_OF_GENERATION:
            token_id = tokenizer.token_to_id(text)
            if token_id is not None:
                stops.add(token_id)
        self.stop_ids = frozenset(stops)

    # ------------------------------------------------------------ encode / decode

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self.tokenizer)

    # ------------------------------------------------------------ chat

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the model's Jinja2 chat template (as transformers' apply_chat_template(tokenize=False))."""
        if self.chat_template is None:
            raise CanaoError(f"{self.source}: this model has no chat template; pass chat=False to feed raw text")
        import jinja2

        try:
            template = _compile_template(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_id),
                eos_token=self._token_text(self.eos_id),
                pad_token=self._token_text(self.pad_id),
            )
        except jinja2.TemplateError as exc:
            raise CanaoError(f"{self.source}: the chat template failed to render ({exc})") from None

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tokenizer.id_to_token(token_id) or "")

    # ------------------------------------------------------------ loading

    @classmethod
    def from_gguf(cls, gf) -> "BPETokenizer":
        """From a GGUF's tokenizer.ggml.* metadata (a `gguf_loader.GGUFFile`)."""
        kind = gf.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CanaoError(
                f"{gf.path}: tokenizer type '{kind}' is not supported; canao reads byte-level BPE ('gpt2') vocabularies "
                "(SmolLM, GPT-2, Llama 3, Qwen2)"
            )
        pre = gf.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise CanaoError(
                f"{gf.path}: pre-tokenizer '{pre}' is not supported; known: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        tokens = list(gf.require("tokenizer.ggml.tokens"))
        types = list(gf.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ")) for m in gf.require("tokenizer.ggml.merges")]
        if any(len(m) != 2 for m in merges):
            raise CanaoError(f"{gf.path}: malformed tokenizer.ggml.merges entry (expected 'left right')")

        # Byte-level vocabularies spell every byte as a printable character; respell any token a
        # converter stored raw so BPE can find it.
        alphabet = _byte_alphabet()
        letters = set(alphabet.values())
        spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in IGNORE_MERGES)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>...) must match whole in text and be special (skipped on decode).
        # A "control" token written outside the byte alphabet is a converter mislabel, as in transformers.
        tok.add_special_tokens([
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= letters
        ])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])

        def opt_id(key):
            value = gf.get(key)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos, eos, pad = opt_id("tokenizer.ggml.bos_token_id"), opt_id("tokenizer.ggml.eos_token_id"), opt_id("tokenizer.ggml.padding_token_id")
        _add_bos_eos(tok, tokens, bos if gf.get("tokenizer.ggml.add_bos_token") else None,
                     eos if gf.get("tokenizer.ggml.add_eos_token") else None)
        return cls(tok, bos_id=bos, eos_id=eos, pad_id=pad, chat_template=gf.get("tokenizer.chat_template"),
                   source=str(gf.path))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "BPETokenizer":
        """From a Hugging Face folder: tokenizer.json (+ tokenizer_config.json, chat_template.jinja)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise CanaoError(f"{folder}: no tokenizer.json; save the tokenizer with the model (tokenizer.save_pretrained)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise CanaoError(f"{path}: unreadable tokenizer ({exc})") from None
        config = {}
        if (folder / "tokenizer_config.json").exists():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as exc:
                raise CanaoError(f"{folder / 'tokenizer_config.json'}: not valid JSON ({exc})") from None

        def special_id(name):
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        eos = special_id("eos_token")
        if eos is None:
            eos = _config_eos(folder)
        return cls(tok, bos_id=special_id("bos_token"), eos_id=eos, pad_id=special_id("pad_token"),
                   chat_template=template, source=str(folder))


def _config_eos(folder: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        if (folder / name).exists():
            try:
                value = json.loads((folder / name).read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                continue
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
    return None


def _add_bos_eos(tok: Tokenizer, tokens: list[str], bos: int | None, eos: int | None) -> None:
    """Post-processor that adds BOS/EOS when the file asks for it (add_special_tokens=True)."""
    if bos is None and eos is None:
        return
    head = [f"{tokens[bos]}:0"] if bos is not None else []
    tail = [f"{tokens[eos]}:0"] if eos is not None else []
    special = [(tokens[i], i) for i in (bos, eos) if i is not None]
    tok.post_processor = processors.TemplateProcessing(
        single=head + ["$A:0"] + tail, pair=head + ["$A:0"] + tail + head + ["$B:1"] + tail, special_tokens=special
    )


class StreamDecoder:
    """Token ids in, text pieces out; holds back bytes of a multi-byte character until complete."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""


@lru_cache(maxsize=8)
def _compile_template(source: str):
    """Sandboxed Jinja2 with the same settings and helpers transformers gives chat templates."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


__all__ = ["BPETokenizer", "StreamDecoder", "PRE_TOKENIZERS"]
