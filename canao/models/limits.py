"""Bounds on the sizes a model file may declare: a corrupt or crafted config must end in a one-line
error, not a division by zero or tables sized until memory runs out."""

from __future__ import annotations

from ..errors import CanaoError

LIMITS = {
    "vocab_size": 1 << 21,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_layers": 1024,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "head_dim": 1024,
    "max_seq_len": 1 << 17,  # RoPE / position tables are sized by it (Llama 3.1's 131,072 fits)
}


def check_sizes(where, **values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= LIMITS[name]:
            raise CanaoError(f"{where}: {name} = {v!r} is outside 1..{LIMITS[name]}; the file is corrupt or "
                             "describes a model canao does not run")
