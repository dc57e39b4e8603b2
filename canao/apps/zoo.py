"""The shipped QA students (canao/zoo), compiled once per machine and cached.

    path = compiled_student("minilm-squad-4x")   # $CANAO_CACHE/artifacts/minilm-squad-4x-<digest>-int8-<target>

The artifact is keyed by the student's weights, the precision and the host's compiler target,
so a changed model or another CPU gets its own build; it is built in a temporary folder and
renamed when complete, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ..fileio import file_digest
from ..paths import cache_root, resolve_model_path

STUDENTS = ("minilm-squad-4x", "minilm-squad-8x")
DEFAULT_QA = "minilm-squad-4x"


def compiled_student(name: str, precision: str = "int8", max_seq: int = 384, threads: int | None = None,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    from ..compiler import compile_model
    from ..compiler.targets import host_target
    from ..models.checkpoint import weight_files
    from ..models.encoders import load_encoder
    from ..models.wordpiece import tokenizer_files

    source = resolve_model_path(name)
    digest = file_digest(weight_files(source)[0])[:12]
    out = cache_root() / "artifacts" / f"{name}-{digest}-{precision}-s{max_seq}-{host_target().name}"
    if (out / "manifest.json").exists():
        return out
    log(f"canao: compiling {name} ({precision}, max length {max_seq}) once into {out}")
    model, _ = load_encoder(source, task="qa")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        compile_model(model, tmp / "artifact", precision=precision, max_seq=max_seq, threads=threads)
        for fname, path in tokenizer_files(source).items():
            shutil.copyfile(path, tmp / "artifact" / fname)
        (tmp / "artifact").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
