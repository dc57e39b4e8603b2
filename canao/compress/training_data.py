"""The distillation data of a teacher, made once: augmented questions, windows and the teacher's logits.

`prepare` runs augmentation (augment.py) and the teacher cache (teacher_cache.py) under
$CANAO_CACHE/distill/<teacher digest>/, each resumable and keyed by what it depends on, and
returns the cached windows. Every stage and every candidate of every search reads the same
windows: the supernet, phase 2 and the baselines differ only in which student learns from them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from ..fileio import file_digest
from ..paths import cache_root
from ..tasks import squad
from .augment import Augmented, AugmentRecipe, augment_from_teacher, teacher_digest
from .teacher_cache import CachedWindows, TeacherCache, WindowSettings, cache_key


def _short(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def prepare(teacher, tok, teacher_dir: str | Path, train_file: str | Path, recipe: AugmentRecipe | None,
            settings: WindowSettings = WindowSettings(), limit: int | None = None, engine: str = "canao",
            root: str | Path | None = None, threads: int | None = None, progress: bool = True,
            log=lambda msg: None) -> CachedWindows:
    """Windows of the first `limit` training questions (all when None) and, unless `recipe` is None, of
    their augmented copies, with the teacher's logits. `teacher` is the loaded model (any channel
    order: reordering does not change its outputs)."""
    tdig = teacher_digest(teacher_dir)
    ddig = file_digest(train_file)[:16]
    base = Path(root or cache_root()) / "distill" / tdig
    originals = squad.read_squad(train_file, limit)
    examples, original = list(originals), [True] * len(originals)
    aug_id = "none"
    if recipe is not None:
        aug = Augmented(base / f"augment-{_short({**asdict(recipe), 'data': ddig, 'limit': limit})}")
        if not (aug.recipe() or {}).get("complete"):
            log(f"augmenting {len(originals)} training questions x {recipe.copies} ({aug.folder})")
            augment_from_teacher(teacher_dir, train_file, aug.folder, recipe, limit, progress)
        copies = aug.examples()
        examples += copies
        original += [False] * len(copies)
        aug_id = aug.digest()
    key = cache_key(tdig, f"{ddig}|{limit}|{aug_id}", settings)
    cache = TeacherCache(base / f"teacher-{key}")
    if not cache.complete():
        log(f"teacher outputs for {len(examples)} questions ({engine}; {cache.folder})")
        cache.build(teacher, tok, examples, original, key, settings, engine=engine, threads=threads, progress=progress,
                    describe={"teacher_digest": tdig, "train_digest": ddig, "limit": limit, "augmentation": aug_id})
    return cache.load()
