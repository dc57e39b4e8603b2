"""WordPiece tokenizers for BERT-family encoders, through the `tokenizers` library."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from ..errors import CanaoError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(folder: str | Path) -> dict[str, Path]:
    """{name: path} of the tokenizer files present in `folder` (what a saved model or an artifact carries)."""
    return {name: Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).exists()}


def load_wordpiece(folder: str | Path) -> Tokenizer:
    """tokenizer.json when present (exact HF behaviour), else vocab.txt (+ do_lower_case).

    The returned tokenizer gives character offsets into the original text, which
    span decoding maps answers back through. Truncation and padding are off: the
    callers window long inputs themselves.
    """
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the library raises a bare Exception on malformed JSON
            raise CanaoError(f"{folder / 'tokenizer.json'}: cannot be read as a tokenizer ({exc})") from None
    elif (folder / "vocab.txt").exists():
        lower = True
        if (folder / "tokenizer_config.json").exists():
            try:
                lower = bool(json.loads((folder / "tokenizer_config.json").read_text()).get("do_lower_case", True))
            except (ValueError, AttributeError) as exc:
                raise CanaoError(f"{folder / 'tokenizer_config.json'}: not a valid tokenizer config ({exc})") from None
        try:
            tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)._tokenizer
        except Exception as exc:  # the library raises a bare Exception on a vocabulary it cannot read
            raise CanaoError(f"{folder / 'vocab.txt'}: cannot be read as a WordPiece vocabulary ({exc})") from None
    else:
        raise CanaoError(f"{folder}: no tokenizer.json or vocab.txt; copy the tokenizer files of the base model into it")
    tok.no_truncation()
    tok.no_padding()
    for special in ("[CLS]", "[SEP]", "[PAD]"):
        if tok.token_to_id(special) is None:
            raise CanaoError(f"{folder}: tokenizer has no {special} token; is it a BERT WordPiece vocabulary?")
    return tok
