"""`canao compile`: a checkpoint folder or GGUF file -> a native artifact (`canao bench` is in canao.baselines)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CanaoError


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_common

    p = sub.add_parser("compile", help="compile a QA encoder or a Llama decoder into a native artifact "
                                       "(generated C + library + weights)")
    p.add_argument("--model", required=True,
                   help="QA checkpoint folder (Hugging Face layout), or a decoder: .gguf file, HF llama folder, smollm2")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "int8", "q8_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"],
                   help="encoders: fp32 (default), bf16, int8; decoders: q4_1 (default), q8_0, fp32, or llama.cpp's "
                        "k-quant mixes q4_k_m, q5_k_m, q6_k")
    p.add_argument("--attention", default=None, choices=["fp32", "int8"],
                   help="encoders: precision of the attention's two products (default: int8 for an int8 model, "
                        "fp32 otherwise; with --verify, an int8 model whose F1 check fails with int8 products is "
                        "compiled again with fp32 ones); the softmax is fp32 either way")
    p.add_argument("--kv-cache", default=None, choices=["f32", "f16"],
                   help="decoders: the KV cache's element type (default f16 for q4_1 / q8_0, as llama.cpp; f32 for fp32)")
    p.add_argument("--target", default="host",
                   help="host, x86-64 (a build for each of avx512_vnni, avx512 and avx2 in one artifact, the widest "
                        "the CPU runs picked at load), avx512, avx512_vnni, avx2, or aarch64 (ARMv8.2-A + dotprod: cross-compiled with "
                        "aarch64-linux-gnu-gcc into a static canao-run; default: host)")
    p.add_argument("--max-seq", type=int, default=None,
                   help="longest input the artifact accepts (encoders: default 384; decoders: context, default 2048)")
    p.add_argument("--verify", action="store_true", help="compare with the PyTorch model on random and SQuAD inputs")
    p.add_argument("--tune", action="store_true",
                   help="measure GEMM schedules the tuning database lacks (~/.cache/canao/tuning.json, "
                        "$CANAO_CACHE or $CANAO_TUNING_DB); without it, known schedules are still used")
    p.add_argument("--no-tuning-db", action="store_true", help="ignore the tuning database (default schedules)")
    p.add_argument("--data", help="data folder for --verify's real inputs (default $CANAO_DATA)")
    add_common(p)
    p.set_defaults(func=cmd_compile)


def _is_decoder_source(spec: str) -> bool:
    """A GGUF file, or a folder whose config.json names a causal LM, is compiled as a decoder."""
    import json

    from ..models.decoders import HF_ARCHITECTURES
    from ..paths import resolve_model_path

    path = resolve_model_path(spec)
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    config = path / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") in HF_ARCHITECTURES
    except (OSError, json.JSONDecodeError):
        return False


def cmd_compile_decoder(args) -> dict:
    from .decoder import compile_decoder

    if args.attention:
        raise CanaoError("--attention applies to encoders; a decoder's attention runs in fp32")
    if args.verify or args.tune:
        raise CanaoError("--verify and --tune apply to encoders; a decoder is checked by `pytest tests/compiler/"
                         "test_decoder.py` (greedy tokens equal PyTorch's) and measured by `canao device measure` and benchmarks/decode_baselines.py")
    precision = args.precision or "q4_1"
    summary = compile_decoder(args.model, args.out, precision=precision,
                              max_seq=args.max_seq if args.max_seq_given else 2048, target=args.target,
                              threads=args.threads, kv_cache=args.kv_cache)
    if not args.json:
        w = summary["weights"]
        print(f"wrote {summary['artifact']} (decoder, {summary['target']}, {precision}, context {summary['max_seq']}, "
              f"KV cache {summary['kv_cache']})")
        layers = ", ".join(f"{n} {f}" for f, n in sorted(w["matrix_formats"].items()))
        print(f"  weights {w['bytes'] / 1e6:.1f} MB: layer matrices {layers}, embedding {w['embedding_format']}, output "
              f"{w['output_format']}; {w['copied_from_source']} matrices copied block for block from the source, "
              f"{w['requantized']} requantized")
    return summary


def cmd_compile(args) -> dict:
    args.max_seq_given = args.max_seq is not None
    if _is_decoder_source(args.model):
        return cmd_compile_decoder(args)
    if args.kv_cache:
        raise CanaoError("--kv-cache applies to decoders (GGUF files, llama / qwen2 / phi3 / gpt2 folders)")
    args.precision = args.precision or "fp32"
    args.max_seq = args.max_seq or 384
    if args.precision not in ("fp32", "bf16", "int8"):
        raise CanaoError(f"precision {args.precision} is for decoders; an encoder compiles to fp32, bf16 or int8")
    from ..models.encoders import load_encoder
    from ..paths import resolve_model_path
    from . import compile_model, load_artifact
    from .artifact import add_files
    from .verify import random_cases, squad_cases, verify

    from ..models.wordpiece import tokenizer_files

    source = resolve_model_path(args.model)
    model, tokenizer = load_encoder(source, task="qa")
    tune = False if args.no_tuning_db else (True if args.tune else None)

    def build(attention: str | None) -> dict:
        summary = compile_model(model, args.out, precision=args.precision, max_seq=args.max_seq,
                                target=args.target, threads=args.threads, tune=tune,
                                log=lambda line: print(line, file=sys.stderr), attention=attention)
        # The apps tokenize before they run the artifact: it carries the model's tokenizer.
        add_files(Path(summary["artifact"]), tokenizer_files(source))
        return summary

    summary = build(args.attention)
    if args.verify:
        from .standalone import RunnerModel
        from .targets import X86_64, get_target, is_cross

        if args.target != X86_64 and is_cross(get_target(args.target)):
            # another ISA: its canao-run under qemu-user (slow, so fp32 parity only: reduced precision is judged
            # by SQuAD F1 over hundreds of questions)
            if args.precision != "fp32":
                raise CanaoError(f"--verify of a {args.precision} {args.target} artifact needs SQuAD F1 over "
                                 f"hundreds of questions, too slow under qemu; verify --precision fp32, or measure "
                                 f"F1 on the device")
            compiled = RunnerModel(args.out, threads=args.threads)
        else:
            compiled = load_artifact(args.out, threads=args.threads)
        cases = random_cases(model.config.vocab_size, args.max_seq)
        squad = None
        try:
            from ..paths import data_file

            squad = data_file(args.data, "squad/dev-v1.1.json")
            cases += squad_cases(tokenizer, squad, args.max_seq)
        except CanaoError as exc:
            print(f"canao compile: no real inputs for --verify ({exc}); random inputs only", file=sys.stderr)
        if args.precision == "fp32":
            summary["verify"] = verify(model, compiled, cases)
            if not summary["verify"]["ok"]:
                raise CanaoError(f"verification failed: max abs error {summary['verify']['max_abs_err']:.3g} "
                                 f"> {summary['verify']['tolerance']}")
        else:
            # reduced precision is judged by its answers: SQuAD F1 on a fixed slice vs fp32
            if squad is None:
                raise CanaoError(f"--verify of a {args.precision} artifact needs SQuAD dev (--data or $CANAO_DATA)")

            def judged(compiled) -> dict:
                checked = verify(model, compiled, cases, tolerance=float("inf"))
                checked["f1"] = _squad_f1_verdict(model, tokenizer, compiled, squad, args.precision, args.max_seq)
                checked["ok"] = checked["f1"]["ok"]
                return checked

            summary["verify"] = checked = judged(compiled)
            first = None
            if not checked["ok"] and args.attention is None and summary["attention"] == "int8":
                # the attention's precision was the default, not the user's: int8 products can cost F1 on short
                # windows (the teacher at --max-seq 128: -1.9 with them, -0.2 without), so try fp32 products
                first = checked["f1"]
                print(f"canao compile: int8 F1 {first['f1']:.2f} vs fp32 {first['f1_fp32']:.2f} with int8 attention "
                      "products; compiling again with fp32 attention products", file=sys.stderr)
                compiled.close()
                summary = build("fp32")
                compiled = load_artifact(args.out, threads=args.threads)
                summary["verify"] = checked = judged(compiled)
                checked["int8_attention"] = first
            f1 = checked["f1"]
            if not f1["ok"]:
                retried = (f" with fp32 attention products ({first['f1']:.2f} with int8 ones; " if first else " (")
                raise CanaoError(f"verification failed: {args.precision} F1 {f1['f1']:.2f} vs fp32 {f1['f1_fp32']:.2f} "
                                 f"on {f1['questions']} questions{retried}allowed drop {f1['tolerance']})")
    if not args.json:
        f = summary["fusion"]
        print(f"wrote {summary['artifact']} ({summary['target']['name']}, {summary['precision']}, attention "
              f"{summary['attention']}, max seq {summary['max_seq']})")
        print(f"  fusion: {f['ops_before']} ops -> {f['kernels_after']} kernels, "
              f"{f['intermediate_bytes_avoided'] / 1e6:.1f} MB of intermediates avoided at seq {f['at_seq']}")
        print(f"  arena peak {summary['memory']['arena_peak_bytes'] / 1e6:.2f} MB, "
              f"weights {summary['memory']['weight_bytes'] / 1e6:.1f} MB")
        t = summary["tuning"]
        if "signatures" in t:
            print(f"  tuning: {t['signatures']} GEMM signatures, {t['reused']} from {t['db']}, "
                  f"{t['measured']} measured ({t['seconds']:.1f} s)")
        if args.verify:
            print(f"  verify: max abs error {summary['verify']['max_abs_err']:.2e} on {len(summary['verify']['cases'])} inputs")
            if "f1" in summary["verify"]:
                f1 = summary["verify"]["f1"]
                print(f"  verify: SQuAD F1 {f1['f1']:.2f} vs fp32 {f1['f1_fp32']:.2f} on {f1['questions']} dev questions "
                      f"(delta {f1['f1_delta']:+.2f}, allowed drop {f1['tolerance']})")
    return summary


def _squad_f1_verdict(model, tokenizer, compiled, squad_file: Path, precision: str, max_seq: int) -> dict:
    """SQuAD F1 of the artifact and of the fp32 PyTorch model on the first F1_QUESTIONS dev questions
    (windows of max_seq tokens), judged by verify.f1_verdict."""
    import numpy as np
    import torch

    from ..tasks.squad import evaluate, read_squad
    from .verify import F1_QUESTIONS, f1_verdict

    examples = read_squad(squad_file, limit=F1_QUESTIONS)
    max_len = min(384, max_seq)
    stride = min(128, max_len // 3)

    def torch_run(ids, tt, mask):
        with torch.inference_mode():
            s, e = model(torch.as_tensor(ids), torch.as_tensor(tt), torch.as_tensor(mask))
        return s.numpy(), e.numpy()

    ref = evaluate(torch_run, tokenizer, examples, max_len=max_len, stride=stride)
    got = evaluate(lambda i, t, m: compiled.run(np.asarray(i), np.asarray(t), np.asarray(m)), tokenizer, examples,
                   max_len=max_len, stride=stride)
    return f1_verdict(ref, got, precision, len(examples))
