"""`canao compile`: checkpoint folder -> native artifact."""

from __future__ import annotations

import argparse
import sys

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
    p.add_argument("--data", help="data folder for --verify's real inputs (default $CANAO_DATA)")
    add_common(p)
    p.set_defaults(func=cmd_compile)


def cmd_compile(args) -> dict:
    from ..models.encoders import load_encoder
    from ..paths import resolve_model_path
    from . import compile_model, load_artifact
    from .verify import random_cases, squad_cases, verify

    model, tokenizer = load_encoder(resolve_model_path(args.model), task="qa")
    summary = compile_model(model, args.out, precision=args.precision, max_seq=args.max_seq,
                            target=args.target, threads=args.threads)
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
        if args.verify:
            print(f"  verify: max abs error {summary['verify']['max_abs_err']:.2e} on {len(summary['verify']['cases'])} inputs")
    return summary
