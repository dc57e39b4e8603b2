"""`canao compile` (checkpoint folder -> native artifact) and `canao bench` (latency vs other engines)."""

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
                        "fp32 otherwise); the softmax is fp32 either way")
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

    p = sub.add_parser("bench", help="latency of canao vs other engines on the same weights, interleaved")
    p.add_argument("--model", required=True, help="QA checkpoint folder, or random:bert-base / random:minilm; or a "
                   "decoder (.gguf file, 'smollm2', a compiled decoder artifact): decode steps and time to first token")
    p.add_argument("--artifact", help="canao artifact of that model (default: compile one into --out)")
    p.add_argument("--engines", help="default canao,pytorch,onnxruntime (decoders: canao,llama.cpp)")
    p.add_argument("--seq", help="comma-separated sequence lengths (default 128,384), and/or 'squad' (real dev questions "
                        "at their own lengths; static-shape engines padded to 384) and/or 'squad-unpadded' (the same, "
                        "TFLite converted at each question's length). Decoders: context lengths (default 64,512)")
    p.add_argument("--precision", help="comma-separated: fp32,bf16,int8 (default fp32); decoders: q4_1,q8_0,fp32 "
                   "(default the artifact's, or the file's weight type); engines that lack one skip it")
    p.add_argument("--tune", action="store_true", help="tune canao's GEMMs first (see canao compile --tune)")
    p.add_argument("--data", help="data folder for --seq squad (default $CANAO_DATA)")
    p.add_argument("--runs", type=int, help="timed runs per point (default 20; decoders: decode steps, default 32)")
    p.add_argument("--out", default="out/bench", help="folder for bench.json and bench.md")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--threads", type=_thread_counts, help="thread counts to measure, comma-separated (default 1 and all cores)")
    p.set_defaults(func=cmd_bench)


def _thread_counts(text: str) -> list[int]:
    import argparse

    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of thread counts") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be at least 1, got {text}")
    return counts


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
    from .verify import random_cases, squad_cases, verify, verify_f1

    from ..models.wordpiece import tokenizer_files

    source = resolve_model_path(args.model)
    model, tokenizer = load_encoder(source, task="qa")
    tune = False if args.no_tuning_db else (True if args.tune else None)
    summary = compile_model(model, args.out, precision=args.precision, max_seq=args.max_seq,
                            target=args.target, threads=args.threads, tune=tune,
                            log=lambda line: print(line, file=sys.stderr), attention=args.attention)
    # The apps tokenize before they run the artifact: it carries the model's tokenizer.
    add_files(Path(summary["artifact"]), tokenizer_files(source))
    if args.verify:
        from .runner import RunnerModel
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
            summary["verify"] = verify(model, compiled, cases, tolerance=float("inf"))
            if squad is None:
                raise CanaoError(f"--verify of a {args.precision} artifact needs SQuAD dev (--data or $CANAO_DATA)")
            summary["verify"]["f1"] = f1 = verify_f1(model, tokenizer, compiled, squad, args.precision, args.max_seq)
            summary["verify"]["ok"] = f1["ok"]
            if not f1["ok"]:
                raise CanaoError(f"verification failed: {args.precision} F1 {f1['f1']:.2f} vs fp32 {f1['f1_fp32']:.2f} "
                                 f"on {f1['questions']} questions (allowed drop {f1['tolerance']})")
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


def _bench_model(spec: str):
    """A checkpoint folder, or random:bert-base / random:minilm (random weights of that architecture)."""
    from ..models.bert import BertConfig, BertForQuestionAnswering
    from ..models.encoders import load_encoder
    from ..paths import resolve_model_path

    if spec.startswith("random:"):
        import torch

        archs = {"bert-base": dict(hidden_size=768, layer_heads=[12] * 12, layer_ffn=[3072] * 12, head_dim=64),
                 "minilm": dict(hidden_size=384, layer_heads=[12] * 6, layer_ffn=[1536] * 6, head_dim=32)}
        name = spec.split(":", 1)[1]
        if name not in archs:
            raise CanaoError(f"unknown random architecture '{name}'; choose one of {sorted(archs)}")
        torch.manual_seed(0)
        return BertForQuestionAnswering(BertConfig(**archs[name])).eval(), None
    return load_encoder(resolve_model_path(spec), task="qa")


def _is_bench_decoder(spec: str) -> bool:
    from .decoder.runtime import is_decoder_artifact
    from ..paths import resolve_model_path

    return _is_decoder_source(spec) or is_decoder_artifact(resolve_model_path(spec))


def _bench_decoder(args) -> dict:
    """`canao bench` on a decoder: decode ms per token and time to first token, per context."""
    import json
    import os
    from pathlib import Path

    from ..baselines import decode_bench

    try:
        contexts = [int(s) for s in (args.seq or "64,512").split(",")]
    except ValueError:
        raise CanaoError(f"--seq {args.seq}: a decoder is benchmarked at context lengths (integers), comma-separated") from None
    engines = decode_bench.engine_names(args.engines or "canao,llama.cpp")
    precisions = args.precision.split(",") if args.precision else None
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    report = decode_bench.run_decode_bench(args.model, engines, precisions, contexts, threads,
                                           steps=args.runs or decode_bench.protocol.DECODE_STEPS,
                                           log=lambda line: print(line, file=sys.stderr))
    report["command"] = "canao bench " + " ".join(sys.argv[2:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(decode_bench.markdown(report))
    if not args.json:
        print(decode_bench.markdown(report))
    return report


def cmd_bench(args) -> dict:
    import json
    import os
    from pathlib import Path

    from . import compile_model
    from .bench import SQUAD_SETTINGS, markdown, run_bench, squad_inputs

    if not args.model.startswith("random:") and _is_bench_decoder(args.model):
        return _bench_decoder(args)
    args.engines, args.seq = args.engines or "canao,pytorch,onnxruntime", args.seq or "128,384"
    args.precision, args.runs = args.precision or "fp32", args.runs or 20
    model, tokenizer = _bench_model(args.model)
    try:
        seqs = [s if s in SQUAD_SETTINGS else int(s) for s in args.seq.split(",")]
    except ValueError:
        raise CanaoError(f"--seq {args.seq}: give lengths, 'squad' or 'squad-unpadded', comma-separated") from None
    squad_seqs = [s for s in seqs if s in SQUAD_SETTINGS]
    max_seq = max([s for s in seqs if s not in SQUAD_SETTINGS] + ([384] if squad_seqs else []))
    if squad_seqs and tokenizer is None:
        raise CanaoError(f"--seq {squad_seqs[0]} needs a checkpoint with a tokenizer, not a random model")
    precisions = args.precision.split(",")
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    for prec in precisions:
        if args.artifact and len(precisions) == 1:
            artifacts[prec] = Path(args.artifact)
        elif "canao" in args.engines.split(","):
            artifacts[prec] = out / f"artifact-{prec}"
            compile_model(model, artifacts[prec], precision=prec, max_seq=max_seq, tune=True if args.tune else None,
                          log=lambda line: print(line, file=sys.stderr))
    squad = None
    if squad_seqs:
        from ..paths import data_file

        squad = squad_inputs(tokenizer, data_file(args.data, "squad/dev-v1.1.json"), args.runs)
    report = run_bench(model, artifacts, args.engines.split(","), seqs, threads, runs=args.runs,
                       progress=lambda line: print(line, file=sys.stderr), precisions=precisions, squad=squad)
    report["command"] = "canao bench " + " ".join(sys.argv[2:])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    if not args.json:
        print(markdown(report))
    return report
