"""Decode benchmark of one decoder on several engines: what `canao bench --model FILE.gguf` runs
(and benchmarks/decode_baselines.py, which adds the bandwidth floor and the headline tables).

Every engine is measured through canao.baselines.protocol on the same token ids: the benchmark
text, tokenized by the model's own tokenizer and repeated to each context length. Per context
and thread count, engines take turns (interleaved, `rounds` times): `steps` greedy decode steps
after a prefill of `context` tokens (a row with "phase": "decode", median_ms per token), and the
prefill alone from an empty cache (time to first token, "phase": "ttft").

Engines (each with the precisions it runs; others are skipped and listed as such):
  canao        q4_1, q8_0, q4_k_m, q5_k_m, q6_k, fp32
                                  the compiled decoder (or the --artifact given), built once per
                                  precision and compiler version under $CANAO_CACHE/bench-decoders
  llama.cpp    q4_1, q8_0         the GGUF file itself if it has that type, else canao's
                                  re-quantization of it (llama.cpp's own f16 KV cache)
  onnxruntime  fp32               the Llama graph exported with its KV cache (Llama only)
  pytorch      fp32               canao's eager model, float32 weights dequantized from the file
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from ..errors import CanaoError
from . import protocol

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
        "Books became cheaper, literacy spread across Europe, and scientists could share their results "
        "with colleagues in distant cities. Within fifty years, presses were running in more than two "
        "hundred towns, and millions of copies had been printed. ")
GREEDY_PROMPT = "Once upon a time, in a small village by the sea, there lived a"
GREEDY_TOKENS = 32
ENGINE_PRECISIONS = {"canao": ("q4_1", "q8_0", "q4_k_m", "q5_k_m", "q6_k", "fp32"), "llama.cpp": ("q4_1", "q8_0"),
                     "onnxruntime": ("fp32",), "pytorch": ("fp32",)}
ALIASES = {"llamacpp": "llama.cpp", "ort": "onnxruntime", "torch": "pytorch"}


def prompt_ids(tokenizer, context: int) -> list[int]:
    """`context` token ids of the benchmark text, repeated as needed."""
    ids = tokenizer.encode(TEXT)
    return (ids * (context // len(ids) + 1))[:context]


def main_weight_type(weight_types: dict) -> str | None:
    """The tensor type most of a GGUF file's tensors have (load_causal_lm's info["weight_types"])."""
    return max(weight_types, key=weight_types.get, default=None)


def default_precision(weight_types: dict, compiled: str | None) -> str:
    """An artifact's own precision; for a GGUF file its main weight type where canao and llama.cpp both
    run it (q4_1, q8_0), else q8_0; fp32 for a checkpoint folder."""
    if compiled is not None:
        return compiled
    main = main_weight_type(weight_types)
    return main.lower() if main in ("Q4_1", "Q8_0") else "q8_0" if weight_types else "fp32"


def source_of(spec) -> tuple[Path, Path | None]:
    """(the model's source file or folder, the artifact if `spec` is a compiled decoder)."""
    from ..compiler.decoder.decoder_runtime import is_decoder_artifact
    from ..paths import resolve_model_path

    path = resolve_model_path(spec)
    if not is_decoder_artifact(path):
        return path, None
    source = Path(json.loads((path / "manifest.json").read_text())["model"]["source"])
    return source, path


class Engine:
    """One engine at one precision: measure(ids, threads) -> {"decode_ms": [...], "ttft_ms": [...]}."""

    def __init__(self, name: str, precision: str, version: str, make=None, worker=None):
        self.name, self.precision, self.version = name, precision, version
        self._make, self._worker, self._made = make, worker, {}
        self.weight_path: Path | None = None
        self.weight_bytes: int | None = None
        self.kv_bytes_per_elem = 4

    def _get(self, threads: int):
        if threads not in self._made:
            self._made[threads] = self._make(threads)
        return self._made[threads]

    def measure(self, ids: list[int], threads: int, steps: int = protocol.DECODE_STEPS) -> dict:
        if self._worker is not None:  # llama.cpp measures in its own process, with the same protocol
            self._worker.threads(threads)
            return {"decode_ms": self._worker.decode_ms(ids, steps, protocol.DECODE_WARMUP),
                    "ttft_ms": self._worker.ttft_ms(ids, protocol.TTFT_RUNS)}
        e = self._get(threads)
        return {"decode_ms": protocol.decode_ms(e, ids, steps), "ttft_ms": protocol.ttft_ms(e, ids)}

    def greedy(self, ids: list[int], n: int) -> list[int]:
        if self._worker is not None:
            self._worker.threads(1)
            return self._worker.greedy(ids, n)
        return protocol.greedy(self._get(1), ids, n)


def canao_engine(source: Path, precision: str, n_ctx: int, artifact: Path | None = None, log=None) -> Engine:
    from ..compiler.build import compiler_fingerprint
    from ..paths import cache_dir
    from ..compiler.decoder import CompiledDecoder, compile_decoder
    from ..compiler.decoder.decoder_runtime import is_decoder_artifact
    from ..fileio import file_digest

    if artifact is None:
        # keyed by the source file and the compiler: a changed kernel is recompiled, not timed stale
        key = file_digest(source)[:12] if source.is_file() else source.name
        artifact = cache_dir() / "bench-decoders" / f"{source.stem}-{key}-{precision}-{n_ctx}-{compiler_fingerprint()[:12]}"
        if not is_decoder_artifact(artifact):
            if log:
                log(f"canao: compiling {source.name} to {precision} (context {n_ctx})")
            compile_decoder(str(source), artifact, precision=precision, max_seq=n_ctx)
    manifest = json.loads((artifact / "manifest.json").read_text())
    if int(manifest["max_seq"]) < n_ctx:
        raise CanaoError(f"{artifact}: compiled for {manifest['max_seq']} positions, the benchmark needs {n_ctx}; "
                         f"recompile with --max-seq {n_ctx} or lower --seq")
    w = manifest["weights"]
    eng = Engine("canao", manifest["precision"],
                 f"canao {manifest['precision']} ({manifest['target']['name']}, layers {w['weights_format']}, "
                 f"output {w['embedding_format']})",
                 make=lambda threads: CompiledDecoder(artifact, threads=threads))
    eng.weight_path, eng.weight_bytes = artifact / "weights.bin", int(w["bytes"])
    eng.kv_bytes_per_elem = 2 if manifest.get("kv_cache") == "f16" else 4
    return eng


def llamacpp_engine(source: Path, precision: str, n_ctx: int, weight_types: dict, log=None) -> Engine:
    """weight_types: the file's tensor type counts; the file itself is used if most are `precision`."""
    from ..models.gguf_convert import converted
    from .llamacpp import Worker

    if not source.is_file():
        raise CanaoError(f"llama.cpp reads GGUF files; {source} is a folder")
    qtype = precision.upper()
    path = source if main_weight_type(weight_types) == qtype else converted(source, qtype, log=log)
    worker = Worker(log=log)
    worker.load(path, n_ctx=n_ctx, n_batch=max(512, n_ctx))
    eng = Engine("llama.cpp", precision, f"{worker.version} (llama.cpp, ggml threadpool, -march=native) {qtype}",
                 worker=worker)
    eng.weight_path, eng.kv_bytes_per_elem = path, 2  # llama.cpp's default KV cache type is f16
    return eng


def onnxruntime_engine(source: Path, log=None) -> Engine:
    from ..models.decoders import load_decoder
    from ..models.llama import Llama
    from .onnx_decoder import OrtDecoder, exported

    model, _ = load_decoder(source)
    if not isinstance(model, Llama):
        raise CanaoError(f"the ONNX decoder export covers Llama-family models; {source} is {type(model).__name__}")
    path = exported(model, log=log)
    del model
    import onnxruntime

    return Engine("onnxruntime", "fp32", f"onnxruntime {onnxruntime.__version__} fp32",
                  make=lambda threads: OrtDecoder(path, threads))


def pytorch_engine(source: Path, n_ctx: int) -> Engine:
    import torch

    from ..models.decoders import load_decoder

    model, _ = load_decoder(source)

    class Feeder:
        def __init__(self, threads):
            self.threads = threads
            self.reset()

        def reset(self):
            self.cache, self.pos = model.new_cache(n_ctx), 0

        @torch.inference_mode()
        def feed(self, ids):
            torch.set_num_threads(self.threads)
            out = model(torch.tensor([ids]), self.cache, self.pos, last_only=True)
            self.pos += len(ids)
            return out[0, -1].numpy()

    return Engine("pytorch", "fp32", f"torch {torch.__version__} fp32 eager", make=Feeder)


def make_engine(name: str, precision: str, source: Path, n_ctx: int, artifact: Path | None = None,
                weight_types: dict | None = None, log=None) -> Engine:
    if name == "canao":
        return canao_engine(source, precision, n_ctx, artifact, log)
    if name == "llama.cpp":
        return llamacpp_engine(source, precision, n_ctx, weight_types or {}, log)
    if name == "onnxruntime":
        return onnxruntime_engine(source, log)
    return pytorch_engine(source, n_ctx)


def engine_names(spec: str) -> list[str]:
    names = [ALIASES.get(n, n) for n in spec.split(",") if n]
    unknown = [n for n in names if n not in ENGINE_PRECISIONS]
    if unknown:
        raise CanaoError(f"unknown decoder engine(s) {unknown}; available: {', '.join(ENGINE_PRECISIONS)}")
    return names


def _tokenizer_and_info(path: Path):
    """(tokenizer, {"context_length", "architecture", "weight_types"}) of a GGUF file, HF folder or compiled
    artifact (read from its manifest: the native code is not loaded for this)."""
    from ..compiler.artifact import read_manifest
    from ..models.bpe_tokenizer import BPETokenizer
    from ..models.decoders import is_compiled_artifact, load_causal_lm

    if is_compiled_artifact(path):
        manifest = read_manifest(path, check=False, here=False)
        return BPETokenizer.from_folder(path), {"context_length": int(manifest["max_seq"]), "weight_types": {},
                                                "architecture": manifest["model"]["architecture"]}
    model, tokenizer, info = load_causal_lm(path)
    del model
    return tokenizer, info


def run_decode_bench(spec, engines: list[str], precisions: list[str] | None, contexts: list[int], threads: list[int],
                     steps: int = protocol.DECODE_STEPS, rounds: int = 1, log=None) -> dict:
    """The `canao bench` report for a decoder: rows per (engine, precision, context, threads, phase).
    precisions None: default_precision."""
    from ..compiler.targets import cpu_model

    if steps < 20:
        raise CanaoError("use at least 20 decode steps (--runs) so medians mean something")
    if not contexts or min(contexts) < 1:
        raise CanaoError(f"decode contexts (--seq) must be positive token counts, got {contexts}")
    source, artifact = source_of(spec)
    # the source's tokenizer and context (an artifact alone if its source is not on this machine)
    tokenizer, info = _tokenizer_and_info(source if source.exists() or artifact is None else artifact)
    # the longest prompt, the warm-up and the timed steps must fit the cache
    n_ctx = max(contexts) + steps + protocol.DECODE_WARMUP + 8
    if n_ctx > int(info["context_length"]):
        raise CanaoError(f"--seq {max(contexts)} plus {steps} steps exceeds the model's context of "
                         f"{info['context_length']} tokens")
    skipped, runners = [], {}
    compiled = json.loads((artifact / "manifest.json").read_text())["precision"] if artifact else None
    precisions = precisions or [default_precision(info.get("weight_types") or {}, compiled)]
    for name in engines:
        for prec in precisions:
            if prec not in ENGINE_PRECISIONS[name] or (name == "canao" and compiled not in (None, prec)):
                skipped.append(f"{name} {prec}")
                continue
            if log:
                log(f"setting up {name} {prec}")
            runners[(name, prec)] = make_engine(name, prec, source, n_ctx, artifact if name == "canao" else None,
                                                info.get("weight_types"), log)
    if not runners:
        raise CanaoError(f"no engine runs precision {','.join(precisions)} (skipped: {', '.join(skipped)})")
    raw = {}
    for _ in range(rounds):
        for context in contexts:
            ids = prompt_ids(tokenizer, context)
            for th in threads:
                for key, eng in runners.items():  # interleaved: background load hits every engine alike
                    out = eng.measure(ids, th, steps)
                    for phase in ("decode", "ttft"):
                        raw.setdefault((*key, context, th, phase), []).extend(out[f"{phase}_ms"])
                    if log:
                        log(f"ctx {context} threads {th} {key[0]} {key[1]}: decode "
                            f"{statistics.median(out['decode_ms']):.2f} ms/token, ttft {statistics.median(out['ttft_ms']):.1f} ms")
    results = []
    for (name, prec, context, th, phase), times in raw.items():
        s = protocol.summary(times)
        row = {"engine": name, "version": runners[(name, prec)].version, "precision": prec, "seq": context,
               "threads": th, "phase": phase, "median_ms": s["median_ms"], "p90_ms": s["p90_ms"], "runs": s["runs"]}
        if phase == "decode":
            row["tokens_per_s"] = 1000.0 / s["median_ms"]
        results.append(row)
    gp = tokenizer.encode(GREEDY_PROMPT)
    greedy = {f"{n} {p}": e.greedy(gp, GREEDY_TOKENS) for (n, p), e in runners.items()}
    return {"model": str(artifact or source), "architecture": info.get("architecture"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "results": results, "skipped": skipped, "rounds": rounds,
            "greedy_prompt": GREEDY_PROMPT, "greedy_prompt_ids": gp, "greedy": greedy,
            "note": f"decode: median ms per token of {steps} greedy steps after a prefill of `seq` tokens (a warm-up "
                    f"round first); ttft: prefill of `seq` tokens from an empty cache, median of {protocol.TTFT_RUNS}; "
                    "engines interleaved", "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def markdown(report: dict) -> str:
    rows = report["results"]
    engines = list(dict.fromkeys(f"{r['engine']} {r['precision']}" for r in rows))
    lines = [f"CPU: {report['cpu']} ({report['cores']} cores). Model: {report['model']}", "",
             "| context | threads | phase | " + " | ".join(f"{e} ms" for e in engines) + " | canao / others |",
             "| --- | --- | --- | " + " | ".join("---" for _ in engines) + " | --- |"]
    for seq, th, phase in dict.fromkeys((r["seq"], r["threads"], r["phase"]) for r in rows):
        got = {f"{r['engine']} {r['precision']}": r["median_ms"] for r in rows
               if (r["seq"], r["threads"], r["phase"]) == (seq, th, phase)}
        ratios = [f"{c} {got[c] / got[e]:.2f}x {e}" for c in got if c.startswith("canao ")
                  for e in got if not e.startswith("canao ")]
        lines.append(f"| {seq} | {th} | {phase} | " + " | ".join(f"{got[e]:.2f}" if e in got else "-" for e in engines)
                     + f" | {'; '.join(ratios)} |")
    lines += ["", "decode: ms per token (lower is better); ttft: ms to the first token's logits."]
    return "\n".join(lines) + "\n"
