"""The artifact folder: generated C, shared library, the canao-run program, packed weights, manifest.json.

The manifest records the target ISA, precision, maximum length and a SHA-256 of
every file, so a corrupted or foreign artifact is refused before it runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import __version__
from ..errors import CanaoError
from ..fileio import file_digest
from .targets import TARGETS, host_arch, is_cross, missing_features

MANIFEST = "manifest.json"
LIBRARY = "libcanao_model.so"
RUNNER = "canao-run"  # standalone C runner (kernels/canao_run.c); the only executable of a cross build
WEIGHTS = "weights.bin"
WEIGHTS_MAGIC = b"CANAOW01"
HEADER_BYTES = 64
FORMAT = 1


sha256 = file_digest  # an artifact's checksums


def begin_folder(out) -> tuple[Path, Path]:
    """(final, partial): the artifact is built in `partial` and renamed by finish_folder, so a failed
    build never leaves a half artifact at `final`. An existing folder that is not an artifact is refused."""
    final = Path(out)
    if final.exists() and not (final / MANIFEST).exists():
        raise CanaoError(f"{final} exists and is not a canao artifact; choose another --out")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return final, partial


def finish_folder(partial: Path, final: Path, info: dict) -> dict:
    """Write the manifest (checksums of everything in `partial`) and move the artifact into place."""
    manifest = write_manifest(partial, info)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return manifest


def write_weights(path: Path, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(WEIGHTS_MAGIC + b"\0" * (HEADER_BYTES - len(WEIGHTS_MAGIC)))
        f.write(blob)


def write_manifest(folder: Path, info: dict) -> dict:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "canao_version": __version__, **info,
                "checksums": {name: sha256(folder / name) for name in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path, check: bool = True, here: bool = True) -> dict:
    """The manifest, after checking the folder is complete, unmodified and (here=True) runs on this CPU."""
    path = folder / MANIFEST
    if not path.exists():
        raise CanaoError(f"{folder} is not a canao artifact (no {MANIFEST}); build one with `canao compile`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CanaoError(f"{path} is corrupted (not valid JSON); rebuild the artifact with `canao compile`") from None
    if manifest.get("format") != FORMAT:
        raise CanaoError(f"{folder}: artifact format {manifest.get('format')} is not {FORMAT}; rebuild it")
    target = TARGETS.get(manifest.get("target", {}).get("name"))
    if target is None:
        raise CanaoError(f"{folder}: unknown target in manifest; rebuild the artifact")
    if here and is_cross(target):
        raise CanaoError(f"{folder} was built for {target.arch} (target {target.name}), not this {host_arch()} "
                         f"machine; run it on the device with canao-run ({folder / RUNNER} "
                         f"{folder / WEIGHTS} --help), or under qemu with canao.compiler.runner")
    missing = missing_features(target) if here else []
    if missing:
        raise CanaoError(f"{folder} was built for {target.name}, but this CPU lacks {', '.join(missing)}; "
                         f"recompile it here with `canao compile --target host`")
    if check:
        for name, digest in manifest.get("checksums", {}).items():
            file = folder / name
            if not file.exists():
                raise CanaoError(f"{folder}: {name} is missing; the artifact is incomplete")
            if sha256(file) != digest:
                raise CanaoError(f"{folder}: {name} does not match its checksum; the artifact is corrupted, rebuild it")
    return manifest
