"""The teacher's outputs on every training window, computed once and shared by every stage.

Distillation needs, per training window, the teacher's start/end logits. Recomputing them at
every step doubles a student's training cost (the teacher is larger than any student), so
`build_cache` runs the teacher once over the windows of the original training questions and
of their augmented copies (augment.py) and stores:

- `windows.safetensors`: the windows, ragged (token ids int32, token types uint8, one offset per
  window), the hard labels (start/end token, 0 when the answer is outside the window), which
  question each window came from and whether that question is an original;
- `logits-NNNNN.safetensors`: the teacher's start/end logits as float16, ragged like the tokens,
  one file per `shard` windows, each written atomically: an interrupted build resumes at the
  first missing shard and loses no finished one;
- `cache.json`: the key (teacher digest, data digest, window settings), counts, the engine.

The folder name is the key, so a changed teacher, data set, augmentation recipe or window
setting gets a new cache and a stale one is never read. The logits come from the teacher
compiled by canao in fp32 (two to three times faster than PyTorch on a CPU; checked against
PyTorch on the first batch, max |diff| <= 1e-3) or from PyTorch (`engine="torch"`, or CUDA).
Hidden states and attention maps are not cached: they cost 384 values per token per layer
(attention maps heads x tokens), 200-1000 times the logits, and the students here are
initialised from the teacher's own weights, where logit distillation on many windows is what
moves F1 (measured in docs/results/distill-losses.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import CanaoError
from ..fileio import atomic_save_tensors, atomic_write_text
from ..tasks import squad

CACHE_FORMAT = 1


@dataclass(frozen=True)
class WindowSettings:
    max_len: int = 256  # SQuAD inputs average ~160 tokens: 256 holds most questions whole
    stride: int = 96
    max_query_tokens: int = 64


class CachedWindows:
    """Ragged windows + teacher logits in memory; `batch(idx)` pads a batch to its longest window."""

    def __init__(self, tokens, types, offsets, starts, ends, question, original, t_logits=None, meta=None):
        self.tokens, self.types, self.offsets = tokens, types, offsets
        self.start_positions, self.end_positions = starts, ends
        self.question, self.original = question, original.astype(bool)
        self.t_logits = t_logits  # (total tokens, 2) float16, or None before the teacher has run
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, keep: np.ndarray) -> "CachedWindows":
        """The windows `keep` (indices), e.g. the originals only."""
        keep = np.asarray(keep)
        lens = self.lengths()[keep]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        take = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in keep]) if len(keep) else \
            np.zeros(0, np.int64)
        return CachedWindows(self.tokens[take], self.types[take], offsets, self.start_positions[keep],
                             self.end_positions[keep], self.question[keep], self.original[keep],
                             None if self.t_logits is None else self.t_logits[take], self.meta)

    def features(self, idx) -> squad.Features:
        """The windows `idx` as padded squad.Features with their labels (what importance scoring reads)."""
        b = self.batch(idx)
        n = len(idx)
        return squad.Features(b["ids"].numpy(), b["types"].numpy(), b["mask"].numpy(), np.arange(n), [[]] * n,
                              b["starts"].numpy(), b["ends"].numpy())

    def batch(self, idx, device=None) -> dict:
        """{"ids", "types", "mask", "starts", "ends", "t_start", "t_end", "original"} as torch tensors."""
        import torch

        idx = np.asarray(idx)
        lens = self.lengths()[idx]
        width = int(lens.max())
        n = len(idx)
        ids = np.zeros((n, width), np.int64)
        types = np.zeros((n, width), np.int64)
        mask = np.zeros((n, width), np.int64)
        t = np.full((n, width, 2), -1e4, np.float32)
        for r, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            ids[r, :b - a] = self.tokens[a:b]
            types[r, :b - a] = self.types[a:b]
            mask[r, :b - a] = 1
            if self.t_logits is not None:
                t[r, :b - a] = self.t_logits[a:b]
        out = {"ids": ids, "types": types, "mask": mask, "starts": self.start_positions[idx].astype(np.int64),
               "ends": self.end_positions[idx].astype(np.int64), "t_start": t[..., 0], "t_end": t[..., 1],
               "original": self.original[idx]}
        return {k: torch.as_tensor(v, device=device) for k, v in out.items()}


def make_windows(tok, examples: list[squad.Example], original: list[bool], settings: WindowSettings) -> CachedWindows:
    """Tokenize into windows (squad.make_features, in chunks so memory stays small) and store them ragged."""
    toks, tys, lens, starts, ends, qs, orig = [], [], [], [], [], [], []
    chunk = 4096
    for lo in range(0, len(examples), chunk):
        part = examples[lo:lo + chunk]
        f = squad.make_features(tok, part, settings.max_len, settings.stride, with_labels=True,
                                max_query_tokens=settings.max_query_tokens)
        L = f.lengths()
        for r in range(len(f)):
            toks.append(f.input_ids[r, :L[r]].astype(np.int32))
            tys.append(f.token_type_ids[r, :L[r]].astype(np.uint8))
        lens.append(L)
        starts.append(f.start_positions)
        ends.append(f.end_positions)
        qs.append(f.example_index + lo)
        orig.append(np.asarray(original[lo:lo + chunk])[f.example_index])
    lens = np.concatenate(lens)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return CachedWindows(np.concatenate(toks), np.concatenate(tys), offsets, np.concatenate(starts).astype(np.int32),
                         np.concatenate(ends).astype(np.int32), np.concatenate(qs).astype(np.int32),
                         np.concatenate(orig).astype(np.uint8))


def cache_key(teacher_digest: str, data_digest: str, settings: WindowSettings) -> str:
    text = json.dumps({"format": CACHE_FORMAT, "teacher": teacher_digest, "data": data_digest, **asdict(settings)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TeacherCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def info(self) -> dict:
        path = self.folder / "cache.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise CanaoError(f"{path}: unreadable; remove the folder {self.folder} to rebuild the cache") from None

    def complete(self) -> bool:
        return bool(self.info.get("complete"))

    def _shard(self, s: int) -> Path:
        return self.folder / f"logits-{s:05d}.safetensors"

    def build(self, teacher, tok, examples: list[squad.Example], original: list[bool], key: str, settings: WindowSettings,
              engine: str = "canao", shard: int = 4096, batch_size: int = 32, threads: int | None = None,
              progress: bool = True, describe: dict | None = None) -> dict:
        """Write the windows (once) and every missing logits shard."""
        from tqdm import tqdm

        info = self.info
        if info and info.get("key") != key:
            raise CanaoError(f"{self.folder} holds a teacher cache with another key; remove it or use another folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        wpath = self.folder / "windows.safetensors"
        if not wpath.exists():
            w = make_windows(tok, examples, original, settings)
            atomic_save_tensors({"tokens": w.tokens, "types": w.types, "offsets": w.offsets, "starts": w.start_positions,
                                 "ends": w.end_positions, "question": w.question, "original": w.original.astype(np.uint8)},
                                wpath)
        windows = self._read_windows()
        n = len(windows)
        n_shards = (n + shard - 1) // shard
        info = {"key": key, "format": CACHE_FORMAT, "settings": asdict(settings), "windows": n, "shard": shard,
                "shards": n_shards, "questions": len(examples), "original_questions": int(sum(original)),
                "tokens": int(windows.offsets[-1]), "engine": engine, **(describe or {}),
                "build_s": info.get("build_s", 0.0)}
        atomic_write_text(self.folder / "cache.json", json.dumps(info, indent=1))
        missing = [s for s in range(n_shards) if not self._shard(s).exists()]
        if missing:
            run, close = _teacher_runner(teacher, engine, settings.max_len, threads, windows)
            try:
                bar = tqdm(total=len(missing) * shard, desc="teacher cache", unit="win", disable=not progress)
                for s in missing:
                    lo, hi = s * shard, min(n, (s + 1) * shard)
                    out = np.zeros((windows.offsets[hi] - windows.offsets[lo], 2), np.float16)
                    order = lo + np.argsort(windows.lengths()[lo:hi], kind="stable")  # similar lengths together
                    for b in range(0, len(order), batch_size):
                        idx = order[b:b + batch_size]
                        bt = windows.batch(idx)
                        start, end = run(bt["ids"].numpy(), bt["types"].numpy(), bt["mask"].numpy())
                        for r, i in enumerate(idx):
                            a, z = windows.offsets[i] - windows.offsets[lo], windows.offsets[i + 1] - windows.offsets[lo]
                            out[a:z, 0] = start[r, :z - a]
                            out[a:z, 1] = end[r, :z - a]
                        bar.update(len(idx))
                    atomic_save_tensors({"logits": out}, self._shard(s))
                bar.close()
            finally:
                close()
        info["complete"] = True
        info["build_s"] = info["build_s"] + time.perf_counter() - t0
        atomic_write_text(self.folder / "cache.json", json.dumps(info, indent=1))
        return info

    def _read_windows(self) -> CachedWindows:
        from safetensors.numpy import load_file

        path = self.folder / "windows.safetensors"
        try:
            d = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
            raise CanaoError(f"{path}: unreadable ({exc}); remove {self.folder} to rebuild the cache") from None
        return CachedWindows(d["tokens"], d["types"], d["offsets"], d["starts"], d["ends"], d["question"], d["original"])

    def load(self) -> CachedWindows:
        """Windows with the teacher's logits; refused while the cache is incomplete."""
        from safetensors.numpy import load_file

        info = self.info
        if not info.get("complete"):
            raise CanaoError(f"{self.folder}: the teacher cache is incomplete; run the same command again to finish it")
        w = self._read_windows()
        parts = []
        for s in range(info["shards"]):
            try:
                parts.append(load_file(str(self._shard(s)))["logits"])
            except Exception as exc:  # noqa: BLE001
                raise CanaoError(f"{self._shard(s)}: unreadable ({exc}); delete that file and run again to "
                                 "recompute it") from None
        w.t_logits = np.concatenate(parts)
        if len(w.t_logits) != w.offsets[-1]:
            raise CanaoError(f"{self.folder}: logits cover {len(w.t_logits)} tokens, windows {w.offsets[-1]}; "
                             "remove the folder to rebuild the cache")
        w.meta = info
        return w


def _teacher_runner(teacher, engine: str, max_len: int, threads: int | None, windows: CachedWindows):
    """(run(ids, types, mask) -> (start, end) numpy, close): the compiled fp32 teacher, checked against
    PyTorch on a first batch, or PyTorch itself."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @torch.no_grad()
    def torch_run(ids, tt, mask):
        s, e = teacher.to(device).eval()(*[torch.as_tensor(a, device=device) for a in (ids, tt, mask)])
        return s.float().cpu().numpy(), e.float().cpu().numpy()

    if engine == "torch" or device.type == "cuda":
        return torch_run, lambda: None
    if engine != "canao":
        raise CanaoError(f"teacher cache engine '{engine}' unknown; use canao or torch")
    from .oracle import artifact_runner, compile_final
    from .space import Arch

    cfg = teacher.config
    tmp = Path(tempfile.mkdtemp(prefix="canao-teacher-"))
    compile_final(teacher.cpu().eval(), tmp / "artifact", Arch(tuple(cfg.layer_heads), tuple(cfg.layer_ffn), max_len),
                  threads or torch.get_num_threads())
    run, close = artifact_runner(tmp / "artifact", threads or torch.get_num_threads())
    check = windows.batch(np.arange(min(8, len(windows))))
    args = [check[k].numpy() for k in ("ids", "types", "mask")]
    got, want = run(*args), torch_run(*args)
    mask = args[2].astype(bool)
    diff = max(float(np.abs(g - w)[mask].max()) for g, w in zip(got, want))
    if diff > 1e-3:
        close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise CanaoError(f"the compiled teacher differs from PyTorch by {diff:.2e} on training windows; "
                         "build the cache with engine='torch'")

    def close_all():
        close()
        shutil.rmtree(tmp, ignore_errors=True)

    return run, close_all
