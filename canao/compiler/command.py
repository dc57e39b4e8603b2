"""`canao compile` (checkpoint folder -> native artifact) and `canao bench` (latency vs other engines)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CanaoError


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_common

    p = sub.add_parser("compile", help="compile a QA encoder into a native artifact (generated C + .so + weights)")
    p.add_argument("--model", required=True, help="QA checkpoint folder (Hugging Face layout)")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    p.add_argument("--target", default="host", help="host, avx512 or avx2 (default: host)")
    p.add_argument("--max-seq", type=int, default=384, help="longest input the artifact accepts")
    p.add_argument("--verify", action="store_true", help="compare with the PyTorch model on random and SQuAD inputs")
    p.add_argument("--tune", action="store_true",
                   help="measure GEMM schedules the tuning database lacks (~/.cache/canao/tuning.json, "
                        "$CANAO_CACHE or $CANAO_TUNING_DB); without it, known schedules are still used")
    p.add_argument("--no-tuning-db", action="store_true", help="ignore the tuning database (default schedules)")
    p.add_argument("--data", help="data folder for --verify's real inputs (default $CANAO_DATA)")
    add_common(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("bench", help="latency of canao vs other engines on the same weights, interleaved")
    p.add_argument("--model", required=True, help="QA checkpoint folder")
    p.add_argument("--artifact", help="canao artifact of that model (default: compile one into --out)")
    p.add_argument("--engines", default="canao,pytorch,onnxruntime")
    p.add_argument("--seq", default="128,384", help="comma-separated sequence lengths")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", default="out/bench", help="folder for bench.json and bench.md")
    add_common(p)
    p.set_defaults(func=cmd_bench)


def cmd_compile(args) -> dict:
    from ..models.encoders import load_encoder
    from ..paths import resolve_model_path
    from . import compile_model, load_artifact
    from .verify import random_cases, squad_cases, verify

    import shutil

    from ..models.wordpiece import TOKENIZER_FILES

    source = resolve_model_path(args.model)
    model, tokenizer = load_encoder(source, task="qa")
    tune = False if args.no_tuning_db else (True if args.tune else None)
    summary = compile_model(model, args.out, precision=args.precision, max_seq=args.max_seq,
                            target=args.target, threads=args.threads, tune=tune,
                            log=lambda line: print(line, file=sys.stderr))
    # The apps tokenize before they run the artifact: it carries the model's tokenizer.
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, Path(summary["artifact"]) / name)
    if args.verify:
        compiled = load_artifact(args.out, threads=args.threads)
        cases = random_cases(model.config.vocab_size, args.max_seq)
        try:
            from ..paths import data_file

            cases += squad_cases(tokenizer, data_file(args.data, "squad/dev-v1.1.json"), args.max_seq)
        except CanaoError as exc:
            print(f"canao compile: no real inputs for --verify ({exc}); random inputs only", file=sys.stderr)
        summary["verify"] = verify(model, compiled, cases)
        if not summary["verify"]["ok"]:
            raise CanaoError(f"verification failed: max abs error {summary['verify']['max_abs_err']:.3g} "
                             f"> {summary['verify']['tolerance']}")
    if not args.json:
        f = summary["fusion"]
        print(f"wrote {summary['artifact']} ({summary['target']['name']}, {summary['precision']}, max seq {summary['max_seq']})")
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
    return summary


def cmd_bench(args) -> dict:
    import json
    import os
    from pathlib import Path

    from ..models.encoders import load_encoder
    from ..paths import resolve_model_path
    from . import compile_model
    from .bench import markdown, run_bench

    model, _ = load_encoder(resolve_model_path(args.model), task="qa")
    seqs = [int(s) for s in args.seq.split(",")]
    threads = [args.threads] if args.threads else [1, os.cpu_count() or 1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifact = Path(args.artifact) if args.artifact else out / "artifact"
    if not args.artifact:
        compile_model(model, artifact, max_seq=max(seqs))
    report = run_bench(model, artifact, args.engines.split(","), seqs, threads, runs=args.runs,
                       progress=lambda line: print(line, file=sys.stderr))
    report["command"] = "canao bench " + " ".join(sys.argv[2:])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    if not args.json:
        print(markdown(report))
    return report
