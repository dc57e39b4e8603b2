"""Several generations at once on one compiled decoder: each sequence has a slot (a KV cache of its
own in C), and the decode steps of the sequences that are generating run together as one batch,
so the weights are read once per step for all of them (decode is bound by reading the weights).

Each generation runs the ordinary Generator code on its own thread; its model calls go through
`SlotLM`, whose steps wait at a `StepBatcher` that runs whatever steps are pending in one
`forward_batch` (continuous batching: a sequence joins or leaves between any two steps).

    gen = Generator(SlotLM(CompiledDecoder(folder), slots=4), tokenizer, info)
    # four threads may now call gen.generate(...) at once
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..compiler.decoder.decoder_runtime import CompiledLMBase
from ..errors import CanaoError


class StepBatcher:
    """Runs the pending steps of all slots as one forward_batch. A step is (slot, ids, first position);
    prompts (several ids) run on their own, single-token steps together."""

    def __init__(self, decoder, slots: int, gather_s: float = 0.002):
        decoder.set_slots(slots)
        self.decoder, self.slots, self.gather_s = decoder, slots, gather_s
        self.cond = threading.Condition()
        self.free = list(range(slots))
        self.active: set[int] = set()   # slots whose sequence is generating
        self.pending: dict[int, list] = {}  # slot -> [ids, pos, result or None, error or None]
        self.running = False
        self.steps = self.batched_tokens = 0  # for the metrics: mean batch = batched_tokens / steps

    def acquire(self) -> int:
        with self.cond:
            while not self.free:  # the server admits at most `slots` generations; a direct caller waits
                self.cond.wait()
            slot = self.free.pop(0)
            self.active.add(slot)
            return slot

    def release(self, slot: int) -> None:
        with self.cond:
            self.active.discard(slot)
            self.pending.pop(slot, None)
            self.free.append(slot)
            self.cond.notify_all()

    def step(self, slot: int, ids: list[int], pos: int) -> np.ndarray:
        """Logits [vocab] of the last of `ids`, placed at positions pos.. of this slot's sequence."""
        entry = [list(ids), int(pos), None, None]
        with self.cond:
            self.pending[slot] = entry
            self.cond.notify_all()
            # the first caller that finds nobody running leads: it runs a batch for everyone pending
            while entry[2] is None and entry[3] is None:
                if not self.running:
                    self._lead()
                else:
                    self.cond.wait()
        if entry[3] is not None:
            raise entry[3]
        return entry[2]

    def _lead(self) -> None:
        """Called holding the lock: gather briefly (until every active slot has a step pending), run
        one batch without the lock, hand out the results."""
        self.running = True
        deadline = time.perf_counter() + self.gather_s
        while len(self.pending) < len(self.active) and time.perf_counter() < deadline:
            self.cond.wait(max(0.0, deadline - time.perf_counter()))
        batch = dict(self.pending)
        self.pending.clear()
        self.cond.release()
        try:
            results = self._run(batch)
        finally:
            self.cond.acquire()
        for slot, entry in batch.items():
            out = results.get(slot)
            if isinstance(out, BaseException):
                entry[3] = out
            else:
                entry[2] = out
        self.running = False
        self.cond.notify_all()

    def _run(self, batch: dict[int, list]) -> dict:
        results: dict = {}
        singles = [s for s, (ids, _, _, _) in batch.items() if len(ids) == 1]
        for slot, (ids, pos, _, _) in batch.items():
            if len(ids) > 1:  # a prompt: its own pass, as a lone generation's (the same logits)
                try:
                    results[slot] = self.decoder.forward(ids, pos, slot).copy()
                except BaseException as exc:  # noqa: BLE001 - goes back to its own caller
                    results[slot] = exc
        if singles:
            try:
                logits = self.decoder.forward_batch([batch[s][0][0] for s in singles], singles,
                                                    [batch[s][1] for s in singles])
                results.update(zip(singles, logits))
                self.steps += 1
                self.batched_tokens += len(singles)
            except BaseException as exc:  # noqa: BLE001
                results.update((s, exc) for s in singles)
        return results


class SlotCache:
    """A generation's handle on its slot; `close` gives the slot back."""

    def __init__(self, batcher: StepBatcher):
        self.batcher = batcher
        self.slot = batcher.acquire()

    def close(self) -> None:
        if self.slot is not None:
            self.batcher.release(self.slot)
            self.slot = None

    def __del__(self):
        self.close()


class SlotLM(CompiledLMBase):
    """The generator's model interface over a compiled decoder with `slots` sequences at once (no
    sample_next: each generation samples from its own logits)."""

    def __init__(self, decoder, slots: int):
        if slots < 1:
            raise CanaoError(f"slots must be at least 1, got {slots}")
        super().__init__(decoder)
        self.slots = slots
        self.batcher = StepBatcher(decoder, slots)

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> SlotCache:
        self._check_cache(max_len, batch)
        return SlotCache(self.batcher)

    def __call__(self, input_ids, cache: SlotCache, start_pos: int = 0, last_only: bool = True):
        """Logits [1, 1, vocab] of the last of input_ids (this model answers last_only calls only)."""
        import torch

        if cache is None or cache.slot is None:
            raise CanaoError("a slot model needs the cache from its new_cache()")
        ids = input_ids.reshape(-1).tolist() if hasattr(input_ids, "reshape") else list(input_ids)
        return torch.from_numpy(self.batcher.step(cache.slot, ids, start_pos)).view(1, 1, -1)


__all__ = ["SlotLM", "StepBatcher"]
