"""`canao bench`: latency of canao against the other engines on the same weights, interleaved in one run.

A QA encoder runs on the engines of canao.baselines.encoder_engines (encoder_bench times them);
a decoder on canao's decoder runtime and the decode baselines (decode_bench)."""

from __future__ import annotations

import argparse
import sys

from ..errors import CanaoError


def register(sub: argparse._SubParsersAction) -> None:
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
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of thread counts") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be at least 1, got {text}")
    return counts


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
    from ..compiler.command import _is_decoder_source
    from ..compiler.decoder.decoder_runtime import is_decoder_artifact
    from ..paths import resolve_model_path

    return _is_decoder_source(spec) or is_decoder_artifact(resolve_model_path(spec))


def _bench_decoder(args) -> dict:
    """`canao bench` on a decoder: decode ms per token and time to first token, per context."""
    import json
    import os
    from pathlib import Path

    from . import decode_bench

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

    from ..compiler import compile_model
    from .encoder_bench import SQUAD_SETTINGS, markdown, run_bench, squad_inputs

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
