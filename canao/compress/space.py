"""The search space: depth, per-layer heads and FFN size, sequence length, precision.

Every candidate is a sub-network of the teacher: its layers are a subset of the
teacher's (chosen by a fixed depth rule), each keeps the first `heads` heads and
the first `ffn` FFN neurons of its teacher layer, and the whole model keeps the
first `hidden` dimensions of the residual stream (embeddings, every layer's
inputs and outputs, the LayerNorms over them), all after importance reordering
(importance.py). The head dimension is the teacher's. So a candidate inherits
teacher weights by slicing, and one weight set (the supernet) holds every candidate.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

from ..errors import CanaoError
from ..models.bert import BertConfig


def keep_layers(depth: int, teacher_layers: int) -> list[int]:
    """Teacher layers a depth-`depth` student keeps: evenly spaced, always the last one
    (DynaBERT-style), e.g. depth 3 of 6 -> [1, 3, 5]."""
    if not 1 <= depth <= teacher_layers:
        raise CanaoError(f"depth {depth} outside 1..{teacher_layers}")
    return [((i + 1) * teacher_layers) // depth - 1 for i in range(depth)]


@dataclass(frozen=True)
class Arch:
    """One candidate. heads[i], ffn[i] describe the i-th kept layer."""

    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    seq: int = 384
    precision: str = "fp32"
    hidden: int = 0  # width of the residual stream; 0: the teacher's

    def __post_init__(self):
        if len(self.heads) != len(self.ffn) or not self.heads:
            raise CanaoError(f"arch: {len(self.heads)} head counts and {len(self.ffn)} FFN sizes; need one of each per layer (>= 1 layer)")

    @property
    def depth(self) -> int:
        return len(self.heads)

    def shape_key(self) -> str:
        """The key without the precision: the supernet's F1 is the same weights at any precision."""
        width = f"-d{self.hidden}" if self.hidden else ""  # keys of teacher-width candidates stay as they were
        return f"L{self.depth}{width}-h{'.'.join(map(str, self.heads))}-f{'.'.join(map(str, self.ffn))}-s{self.seq}"

    def key(self) -> str:
        return f"{self.shape_key()}-{self.precision}"

    def to_dict(self) -> dict:
        d = {"heads": list(self.heads), "ffn": list(self.ffn), "seq": self.seq, "precision": self.precision}
        if self.hidden:
            d["hidden"] = self.hidden
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        return cls(tuple(int(h) for h in d["heads"]), tuple(int(f) for f in d["ffn"]), int(d.get("seq", 384)),
                   str(d.get("precision", "fp32")), int(d.get("hidden", 0)))

    @classmethod
    def parse(cls, text: str) -> "Arch":
        """An architecture from its key ('L6-h2.6.2.2.2.2-f384.384.384.960.384.384-s384-int8', as reports
        print it); a single head count or FFN size stands for every layer ('L6-h2-f384')."""
        import re

        m = re.fullmatch(r"L(\d+)(?:-d(\d+))?-h([\d.]+)-f([\d.]+)(?:-s(\d+))?(?:-(fp32|bf16|int8))?", text.strip())
        if not m:
            raise CanaoError(f"architecture '{text}': write it as L<layers>-h<heads>-f<ffn>[-s<seq>][-<precision>], "
                             "with one value per layer (dots) or one for all, e.g. L6-h2-f384 or L2-h12.6-f1536.768")
        depth = int(m[1])
        heads, ffn = ([int(x) for x in m[i].split(".")] for i in (3, 4))
        heads, ffn = (v * depth if len(v) == 1 else v for v in (heads, ffn))
        if len(heads) != depth or len(ffn) != depth or min(heads + ffn) < 1:
            raise CanaoError(f"architecture '{text}': L{depth} needs {depth} head counts and FFN sizes, each >= 1")
        return cls(tuple(heads), tuple(ffn), int(m[5] or 384), m[6] or "fp32", int(m[2] or 0))

    def width(self, teacher: BertConfig) -> int:
        return self.hidden or teacher.hidden_size

    def bert_config(self, teacher: BertConfig) -> BertConfig:
        return BertConfig(**{**asdict(teacher), "layer_heads": list(self.heads), "layer_ffn": list(self.ffn),
                             "hidden_size": self.width(teacher)})


@dataclass
class SearchSpace:
    teacher_layers: int
    teacher_heads: int  # per layer, the maximum
    teacher_ffn: int
    hidden_size: int
    head_dim: int
    depths: list[int]
    head_choices: list[int]
    ffn_choices: list[int]
    seq_choices: list[int] = field(default_factory=lambda: [384])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    hidden_choices: list[int] = field(default_factory=list)  # residual-stream widths; [] or [teacher's]: fixed

    @classmethod
    def from_teacher(cls, cfg: BertConfig, seq: int | list[int] = 384, precisions: list[str] | None = None,
                     min_depth: int = 1, head_step: int | None = None, ffn_fracs: tuple[float, ...] | None = None,
                     hidden_fracs: tuple[float, ...] = (0.5, 0.75, 1.0)) -> "SearchSpace":
        """A space bounded by the teacher: depths min_depth..L, heads in steps (2 for 12 heads),
        FFN in fractions of the teacher's width, hidden size in fractions of the teacher's
        (multiples of 32 for tidy GEMMs)."""
        if len(set(cfg.layer_heads)) != 1 or len(set(cfg.layer_ffn)) != 1:
            raise CanaoError("search space: the teacher must have uniform layers (a pruned teacher is not a supernet)")
        heads, ffn, L = cfg.layer_heads[0], cfg.layer_ffn[0], cfg.num_layers
        step = head_step or max(1, heads // 6)
        head_choices = sorted({h for h in range(step, heads + 1, step)} | {heads})
        fracs = ffn_fracs or (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
        ffn_choices = sorted({max(32, int(round(ffn * f / 32)) * 32) for f in fracs} | {ffn})
        seqs = [seq] if isinstance(seq, int) else list(seq)
        H = cfg.hidden_size
        hidden = sorted({max(32, int(round(H * f / 32)) * 32) for f in hidden_fracs if f < 1} | {H})
        return cls(L, heads, ffn, H, cfg.head_dim, list(range(min_depth, L + 1)), head_choices,
                   [f for f in ffn_choices if f <= ffn], seqs, precisions or ["fp32"], [h for h in hidden if h <= H])

    def hiddens(self) -> list[int]:
        """The widths as Arch.hidden values: 0 for the teacher's own."""
        return [0 if h == self.hidden_size else h for h in (self.hidden_choices or [self.hidden_size])]

    # --- candidates -------------------------------------------------------
    def largest(self, seq: int | None = None, precision: str | None = None) -> Arch:
        L = max(self.depths)
        return Arch((self.teacher_heads,) * L, (self.teacher_ffn,) * L, seq or max(self.seq_choices),
                    precision or self.precisions[0], max(self.hiddens(), key=lambda h: h or self.hidden_size))

    def smallest(self, seq: int | None = None, precision: str | None = None) -> Arch:
        d = min(self.depths)
        return Arch((min(self.head_choices),) * d, (min(self.ffn_choices),) * d, seq or min(self.seq_choices),
                    precision or self.precisions[0], min(self.hiddens(), key=lambda h: h or self.hidden_size))

    def sample(self, rng: random.Random) -> Arch:
        d = rng.choice(self.depths)
        heads = tuple(rng.choice(self.head_choices) for _ in range(d))
        ffn = tuple(rng.choice(self.ffn_choices) for _ in range(d))
        seq, precision = rng.choice(self.seq_choices), rng.choice(self.precisions)
        hidden = rng.choice(self.hiddens()) if len(self.hiddens()) > 1 else 0  # the same draws as before without it
        return Arch(heads, ffn, seq, precision, hidden)

    def uniform(self, depth: int, heads: int, ffn: int, seq: int | None = None, precision: str | None = None,
                hidden: int = 0) -> Arch:
        return Arch((heads,) * depth, (ffn,) * depth, seq or self.seq_choices[0], precision or self.precisions[0],
                    0 if hidden == self.hidden_size else hidden)

    def contains(self, arch: Arch) -> bool:
        return (arch.depth in self.depths and all(h in self.head_choices for h in arch.heads)
                and all(f in self.ffn_choices for f in arch.ffn) and arch.seq in self.seq_choices
                and arch.precision in self.precisions and arch.hidden in self.hiddens())

    def layers_of(self, arch: Arch) -> list[int]:
        return keep_layers(arch.depth, self.teacher_layers)

    def size(self) -> int:
        per_layer = len(self.head_choices) * len(self.ffn_choices)
        return (sum(per_layer ** d for d in self.depths) * len(self.seq_choices) * len(self.precisions)
                * len(self.hiddens()))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_dict())


def model_bytes(arch: Arch, teacher: BertConfig) -> int:
    """Weight bytes of the candidate (4 per fp32 parameter, 2 bf16, 1 int8 + fp32 embeddings)."""
    cfg = arch.bert_config(teacher)
    n = cfg.num_parameters() + cfg.hidden_size * 2 + 2
    per = {"fp32": 4, "bf16": 2, "int8": 1}.get(arch.precision, 4)
    return n * per


def peak_activation_bytes(arch: Arch, teacher: BertConfig, batch: int = 1) -> int:
    """Upper estimate of live activation memory at batch 1: the widest layer's buffers
    (hidden in/out, QKV, one head's scores per head, FFN intermediate), fp32."""
    s, h, d = arch.seq, arch.width(teacher), teacher.head_dim
    widest = max(3 * s * hd * d + hd * s * s + s * f for hd, f in zip(arch.heads, arch.ffn))
    return 4 * batch * (2 * s * h + widest)
