"""Compile a Llama-family decoder (GGUF file, HF folder or built-in name) into an artifact:
model.c (generated constants) + decoder runtime and kernels, a shared library, the packed
weights, the tokenizer, and a manifest (kind "decoder")."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from ...errors import CanaoError
from .. import artifact
from ..build import BASE_FLAGS, KERNEL_DIR, _run_cc, cache_dir, compiler
from ..targets import get_target
from .codegen import generate
from .pack import PRECISION_FORMATS, Source, pack_llama

DECODER_PRECISIONS = tuple(PRECISION_FORMATS)
DECODER_FILES = ("canao_lm.h", "canao_decoder.c", "canao_decoder_kernels.h")


def _build(folder: Path, target, out: Path) -> None:
    flags = [*BASE_FLAGS, *target.cflags]
    key = hashlib.sha256(" ".join([compiler(), *flags]).encode())
    for name in ("model.c", *DECODER_FILES, target.vec_header):
        key.update((folder / name).read_bytes())
    cached = cache_dir() / "build" / f"lm-{key.hexdigest()[:24]}.so"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            _run_cc([compiler(), *flags, "-I", str(folder), str(folder / "model.c"), "-o", f"{tmp}/lib.so", "-lm"])
            shutil.move(f"{tmp}/lib.so", cached)
    shutil.copyfile(cached, out)


def _save_tokenizer(src: Source, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json, so the artifact needs nothing else to chat."""
    from ...models.bpe_tokenizer import BPETokenizer

    tok = BPETokenizer.from_gguf(src.gguf) if src.gguf is not None else BPETokenizer.from_folder(src.path)
    tok.tokenizer.save(str(folder / "tokenizer.json"))
    config = {name: tok.token(i) for name, i in
              (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)) if i is not None}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def compile_decoder(spec, out, precision: str = "q4_1", max_seq: int = 2048, target: str = "host",
                    threads: int | None = None, log=None) -> dict:
    if precision not in DECODER_PRECISIONS:
        raise CanaoError(f"decoder precision '{precision}' is not available; choose one of {', '.join(DECODER_PRECISIONS)}")
    tgt = get_target(target)
    times = {}
    t0 = time.perf_counter()
    src = Source(spec)
    cfg = src.config
    if not 2 <= max_seq:
        raise CanaoError(f"--max-seq {max_seq} must be at least 2")
    max_ctx = min(max_seq, cfg.max_seq_len)
    packed, formats = pack_llama(src, precision, max_ctx)
    times["pack_ms"] = (time.perf_counter() - t0) * 1e3
    source = generate(cfg, packed, tgt, max_ctx, str(src.path))
    final = Path(out)
    if final.exists() and not (final / artifact.MANIFEST).exists():
        raise CanaoError(f"{final} exists and is not a canao artifact; choose another --out")
    tmp = final.with_name(final.name + ".partial")  # a failed build never leaves a half artifact
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "model.c").write_text(source)
    for name in (*DECODER_FILES, tgt.vec_header):
        shutil.copyfile(KERNEL_DIR / name, tmp / name)
    artifact.write_weights(tmp / artifact.WEIGHTS, bytes(packed.blob))
    _save_tokenizer(src, tmp)
    t0 = time.perf_counter()
    _build(tmp, tgt, tmp / artifact.LIBRARY)
    times["cc_ms"] = (time.perf_counter() - t0) * 1e3
    info = {
        "kind": "decoder",
        "target": {"name": tgt.name, "features": list(tgt.features), "cflags": list(tgt.cflags)},
        "precision": precision,
        "max_seq": max_ctx,
        "threads": threads,
        "model": {"architecture": "llama", **cfg.to_dict(), "source": str(src.path)},
        "weights": {**formats, "bytes": len(packed.blob), "copied_from_source": packed.copied_raw,
                    "requantized": packed.requantized},
    }
    manifest = artifact.write_manifest(tmp, info)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return {"artifact": str(final), "kind": "decoder", "precision": precision, "max_seq": max_ctx,
            "target": manifest["target"]["name"], "weights": info["weights"], "times": times}
