"""ctypes binding of a decoder artifact (canao_lm.h), and the model interface the generator uses."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from ...errors import CanaoError
from ..artifact import MANIFEST
from ..native import NativeArtifact


def is_decoder_artifact(folder) -> bool:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == "decoder"
    except (json.JSONDecodeError, OSError):
        return False


class CompiledDecoder(NativeArtifact):
    """A loaded decoder artifact: forward(ids, pos) fills the KV cache and the last token's logits."""
    PREFIX = "canao_lm"
    SIGNATURES = {
        "canao_lm_forward_all": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
        "canao_lm_forward_batch": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
        "canao_lm_forward_slot": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                                 ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
        "canao_lm_set_slots": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
        "canao_lm_logits": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p]),
        "canao_lm_sample": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_float,
                                           ctypes.POINTER(ctypes.c_uint64)]),
    }

    def __init__(self, folder, threads: int | None = None, check: bool = True):
        super().__init__(folder, threads, check)
        self.max_ctx = int(self.manifest["max_seq"])
        self.vocab = ctypes.c_long.in_dll(self._lib, "canao_lm_vocab").value
        # a view of the C buffer: reading logits never copies them
        self._logits = np.ctypeslib.as_array(self._lib.canao_lm_logits(self._handle), shape=(self.vocab,))

    def _check_manifest(self) -> None:
        if self.manifest.get("kind") != "decoder":
            raise CanaoError(f"{self.path} is an encoder artifact; use it with `canao qa`, not for generation")

    def _check_library(self, lib) -> None:
        if not hasattr(lib, "canao_lm_forward_slot"):
            raise CanaoError(f"{self.path} was compiled by an older canao (no sequence slots); compile it again "
                             "with `canao compile`")

    def forward(self, ids, pos: int, slot: int = 0) -> np.ndarray:
        """Logits [vocab] of the last of `ids` (placed at positions pos.. of the sequence in `slot`); a
        view valid until the next call."""
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int32).reshape(-1))
        self._call("canao_lm_forward_slot", int(slot), arr.ctypes.data, len(arr), int(pos))
        return self._logits

    def forward_all(self, ids, pos: int) -> np.ndarray:
        """Logits [len(ids), vocab] of every position (scoring, perplexity)."""
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int32).reshape(-1))
        out = np.empty((len(arr), self.vocab), np.float32)
        self._call("canao_lm_forward_all", arr.ctypes.data, len(arr), int(pos), out.ctypes.data)
        return out

    def set_slots(self, slots: int) -> None:
        """Caches for `slots` sequences (forgets every cached position); forward() uses slot 0."""
        if slots < 1:
            raise CanaoError(f"slots must be at least 1, got {slots}")
        if self._lib.canao_lm_set_slots(self._handle, int(slots)) != 0:
            raise CanaoError(f"out of memory reserving KV caches for {slots} sequences")
        self.slots = slots

    def forward_batch(self, ids, slots, positions) -> np.ndarray:
        """Logits [n, vocab]: token i of sequence slots[i] at position positions[i], each sequence in a
        cache of its own, all in one pass over the weights (a decode step of several sequences)."""
        arrs = [np.ascontiguousarray(np.asarray(a, dtype=np.int32).reshape(-1)) for a in (ids, slots, positions)]
        if not len(arrs[0]) == len(arrs[1]) == len(arrs[2]):
            raise CanaoError("forward_batch needs one slot and one position per token")
        out = np.empty((len(arrs[0]), self.vocab), np.float32)
        self._call("canao_lm_forward_batch", *(a.ctypes.data for a in arrs), len(arrs[0]), out.ctypes.data)
        return out

    # the decode-benchmark protocol (canao.baselines.protocol): append ids, return the last logits
    def reset(self) -> None:
        self.pos = 0

    def feed(self, ids) -> np.ndarray:
        ids = list(ids)
        logits = self.forward(ids, getattr(self, "pos", 0))
        self.pos = getattr(self, "pos", 0) + len(ids)
        return logits

    def sample(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, state: list | None = None) -> int:
        """Next token from the current logits, drawn in C (state: [uint64] xorshift state, updated)."""
        rng = ctypes.c_uint64(state[0] if state else 0x9E3779B97F4A7C15)
        token = self._lib.canao_lm_sample(self._handle, float(temperature), int(top_k), float(top_p), ctypes.byref(rng))
        if state:
            state[0] = rng.value
        return token


class CompiledLMBase:
    """What the generator's model interface over a compiled decoder always is (`max_seq_len`, `config`,
    `to`, `eval`, `parameters`, the size checks of `new_cache`); CompiledCausalLM and
    canao.apps.slots.SlotLM add the cache and the forward pass."""

    def __init__(self, decoder: CompiledDecoder):
        self.decoder = decoder
        self.config = decoder.manifest["model"]

    @property
    def max_seq_len(self) -> int:
        return self.decoder.max_ctx

    def _check_cache(self, max_len: int | None, batch: int) -> None:
        if batch != 1:
            raise CanaoError("a compiled decoder generates one sequence per cache (batch 1)")
        if max_len is not None and max_len > self.decoder.max_ctx:
            raise CanaoError(f"{max_len} positions requested but the artifact's context is {self.decoder.max_ctx}; "
                             "recompile with a larger --max-seq")

    def to(self, dtype):
        import torch

        if dtype != torch.float32:
            raise CanaoError(f"a compiled decoder runs at its compiled precision ({self.decoder.manifest['precision']}); "
                             "choose the precision at `canao compile` time, not with --dtype")
        return self

    def eval(self):
        return self

    def parameters(self):
        return iter(())


class CompiledCausalLM(CompiledLMBase):
    """The generator's model interface (`model(ids, cache, start_pos, last_only=True)`, `new_cache`,
    `max_seq_len`) over a compiled decoder: the KV cache lives in C, so `new_cache` only checks sizes."""

    def __init__(self, decoder: CompiledDecoder):
        super().__init__(decoder)
        # all-position logits through decode steps instead of one prefill (perplexity of the decode path)
        self.score_by_decode_steps = False

    def new_cache(self, max_len: int | None = None, batch: int = 1):
        self._check_cache(max_len, batch)
        return None

    def __call__(self, input_ids, cache=None, start_pos: int = 0, last_only: bool = False):
        """Logits [1, T, vocab] as the PyTorch model returns them ([1, 1, vocab] with last_only, a view of
        the C buffer: valid until the next call)."""
        import torch

        ids = input_ids.reshape(-1).tolist() if hasattr(input_ids, "reshape") else list(input_ids)
        if last_only or len(ids) == 1:
            return torch.from_numpy(self.decoder.forward(ids, start_pos)).view(1, 1, -1)
        if self.score_by_decode_steps:
            rows = [self.decoder.forward([t], start_pos + i).copy() for i, t in enumerate(ids)]
            return torch.from_numpy(np.stack(rows))[None]
        return torch.from_numpy(self.decoder.forward_all(ids, start_pos))[None]

    def sample_next(self, temperature: float, top_k: int, top_p: float, state: list) -> int:
        return self.decoder.sample(temperature, top_k, top_p, state)
