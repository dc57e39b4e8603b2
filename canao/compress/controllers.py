"""Controllers that propose architectures: the paper's LSTM policy trained with REINFORCE
and a moving-average baseline, regularized evolution, and random search.

All share one interface: `propose() -> Arch` and `observe(arch, reward)`. An
architecture is a sequence of decisions: depth, then (heads, ffn) for each of the
teacher's layer slots (slots beyond the depth are ignored), then sequence length
and precision when the space offers more than one.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import torch
from torch import nn

from .space import Arch, SearchSpace


def decisions(space: SearchSpace) -> list[tuple[str, list]]:
    out = [("depth", space.depths)]
    for i in range(max(space.depths)):
        out += [(f"heads{i}", space.head_choices), (f"ffn{i}", space.ffn_choices)]
    if len(space.seq_choices) > 1:
        out.append(("seq", space.seq_choices))
    if len(space.precisions) > 1:
        out.append(("precision", space.precisions))
    if len(space.hiddens()) > 1:
        out.append(("hidden", space.hiddens()))
    return out


def to_arch(space: SearchSpace, choice: dict) -> Arch:
    d = choice["depth"]
    return Arch(tuple(choice[f"heads{i}"] for i in range(d)), tuple(choice[f"ffn{i}"] for i in range(d)),
                choice.get("seq", space.seq_choices[0]), choice.get("precision", space.precisions[0]),
                choice.get("hidden", 0))


def to_choice(space: SearchSpace, arch: Arch, fill: dict | None = None) -> dict:
    c = dict(fill or {})
    c["depth"] = arch.depth
    for i in range(max(space.depths)):
        c[f"heads{i}"] = arch.heads[i] if i < arch.depth else c.get(f"heads{i}", space.head_choices[-1])
        c[f"ffn{i}"] = arch.ffn[i] if i < arch.depth else c.get(f"ffn{i}", space.ffn_choices[-1])
    c["seq"], c["precision"], c["hidden"] = arch.seq, arch.precision, arch.hidden
    return c


class RandomController:
    name = "random"

    def __init__(self, space: SearchSpace, seed: int = 0):
        self.space, self.rng = space, random.Random(seed)

    def propose(self) -> Arch:
        return self.space.sample(self.rng)

    def observe(self, arch: Arch, reward: float) -> None:
        pass


class EvolutionController:
    """Regularized evolution (Real et al. 2019): tournament selection, one mutation, the oldest dies."""

    name = "evolution"

    def __init__(self, space: SearchSpace, seed: int = 0, population: int = 16, tournament: int = 4):
        self.space, self.rng = space, random.Random(seed)
        self.population: deque[tuple[dict, float]] = deque(maxlen=population)
        self.size, self.tournament = population, tournament
        self.decisions = decisions(space)
        self.pending: dict[Arch, dict] = {}

    def propose(self) -> Arch:
        if len(self.population) < self.size:
            arch = self.space.sample(self.rng)
            self.pending[arch] = to_choice(self.space, arch)
            return arch
        picks = self.rng.sample(list(self.population), min(self.tournament, len(self.population)))
        parent = max(picks, key=lambda p: p[1])[0]
        child = dict(parent)
        name, options = self.rng.choice(self.decisions)
        child[name] = self.rng.choice([o for o in options if o != child.get(name)] or options)
        arch = to_arch(self.space, child)
        self.pending[arch] = child
        return arch

    def observe(self, arch: Arch, reward: float) -> None:
        choice = self.pending.pop(arch, None) or to_choice(self.space, arch)
        self.population.append((choice, reward))


class LSTMPolicy(nn.Module):
    def __init__(self, decisions_: list[tuple[str, list]], hidden: int = 64):
        super().__init__()
        self.sizes = [len(opts) for _, opts in decisions_]
        self.embed = nn.Embedding(sum(self.sizes) + 1, hidden)  # +1: the start token
        self.offsets = np.cumsum([0] + self.sizes[:-1]) + 1
        self.cell = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.sizes)
        self.hidden = hidden

    def run(self, forced: list[int] | None = None, gen: torch.Generator | None = None):
        """Sample (or score `forced`) one decision sequence; returns (indices, sum log-prob, entropy)."""
        h = c = torch.zeros(1, self.hidden)
        token = torch.zeros(1, dtype=torch.long)
        idxs, logp, ent = [], 0.0, 0.0
        for k, head in enumerate(self.heads):
            h, c = self.cell(self.embed(token), (h, c))
            logits = head(h)[0]
            dist = torch.distributions.Categorical(logits=logits)
            i = forced[k] if forced is not None else int(torch.multinomial(dist.probs, 1, generator=gen))
            logp = logp + dist.log_prob(torch.tensor(i))
            ent = ent + dist.entropy()
            idxs.append(i)
            token = torch.tensor([int(self.offsets[k]) + i])
        return idxs, logp, ent


class RLController:
    """The paper's controller: an LSTM emits the decisions one by one; REINFORCE with a
    moving-average baseline (decay `baseline_decay`) and an entropy bonus."""

    name = "rl"

    def __init__(self, space: SearchSpace, seed: int = 0, lr: float = 0.02, baseline_decay: float = 0.9,
                 entropy: float = 1e-3, hidden: int = 64, batch: int = 4):
        self.space = space
        self.decisions = decisions(space)
        torch.manual_seed(seed)
        self.policy = LSTMPolicy(self.decisions, hidden)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.baseline: float | None = None
        self.decay, self.entropy, self.batch = baseline_decay, entropy, batch
        self.pending: dict[Arch, list[int]] = {}
        self.buffer: list[tuple[list[int], float]] = []

    def propose(self) -> Arch:
        with torch.no_grad():
            idxs, _, _ = self.policy.run(gen=self.gen)
        choice = {name: opts[i] for (name, opts), i in zip(self.decisions, idxs)}
        arch = to_arch(self.space, choice)
        self.pending[arch] = idxs
        return arch

    def observe(self, arch: Arch, reward: float) -> None:
        idxs = self.pending.pop(arch, None)
        if idxs is None:
            c = to_choice(self.space, arch)
            idxs = [opts.index(c[name]) if c.get(name) in opts else 0 for name, opts in self.decisions]
        self.baseline = reward if self.baseline is None else self.decay * self.baseline + (1 - self.decay) * reward
        self.buffer.append((idxs, reward - self.baseline))
        if len(self.buffer) >= self.batch:
            self.opt.zero_grad()
            loss = 0.0
            for idxs_, adv in self.buffer:
                _, logp, ent = self.policy.run(forced=idxs_)
                loss = loss - adv * logp - self.entropy * ent
            (loss / len(self.buffer)).backward()
            self.opt.step()
            self.buffer.clear()


CONTROLLERS = {"rl": RLController, "evolution": EvolutionController, "random": RandomController}


def make_controller(name: str, space: SearchSpace, seed: int = 0, proposals: int | None = None):
    """`proposals`: how many the controller will make; evolution sizes its population to it, so a
    short search still gets to mutate (a population of 16 would be random search for 12 proposals)."""
    from ..errors import CanaoError

    if name not in CONTROLLERS:
        raise CanaoError(f"unknown controller '{name}'; choose one of {', '.join(CONTROLLERS)}")
    if name == "evolution" and proposals:
        pop = max(4, min(16, proposals // 3))
        return EvolutionController(space, seed=seed, population=pop, tournament=min(4, max(2, pop // 2)))
    return CONTROLLERS[name](space, seed=seed)
