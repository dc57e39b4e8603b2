"""`canao search`: compiler-aware architecture search + two-phase distillation + compile."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    from ..cli import add_common

    p = sub.add_parser("search", help="CANAO search + two-phase distillation + compile, within a latency budget",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder (BERT-family QA model)")
    p.add_argument("--task", default="squad", choices=["squad"])
    p.add_argument("--data", required=True, help="data folder laid out like ../shared/data")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=float, help="p95 latency budget, batch 1, padded to --seq")
    budget.add_argument("--speedup", type=float,
                        help="budget = the teacher's measured p95 (compiled fp32, same seq and threads) / SPEEDUP")
    p.add_argument("--seq", type=int, default=384, help="maximum sequence length (the compiled model's)")
    p.add_argument("--seq-choices", default=None,
                   help="comma-separated maximum lengths the search may choose (each <= --seq, e.g. 256,384): a "
                        "shorter model splits long contexts into more windows; each candidate is timed at its own")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", choices=["quick", "full"], default="quick")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--controllers", default="rl,evolution,random", help="comma-separated: rl, evolution, random")
    p.add_argument("--max-mb", type=float, default=None, help="model size limit (MB)")
    p.add_argument("--max-mem-mb", type=float, default=None, help="peak memory limit (MB, weights + activations)")
    p.add_argument("--latency-db", default=None, help="measurement database (default ~/.cache/canao/latency-db.json)")
    p.add_argument("--latency-backend", choices=["canao", "torch"], default="canao",
                   help="time canao-compiled code (default) or PyTorch eager")
    p.add_argument("--precisions", default="fp32,int8",
                   help="precisions the search may choose (comma-separated; those the compiler has: fp32, bf16, int8)")
    p.add_argument("--device", default=None,
                   help="time candidates on this device instead of this machine: local, ssh://user@host[:port], "
                        "adb[://SERIAL] (see `canao device measure`); the final artifact is built for its target")
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(func=cmd_search, threads=None)


def cmd_search(args) -> dict:
    import sys

    from .pipeline import Job, run

    job = Job(teacher=Path(args.teacher), data=Path(args.data), out=Path(args.out), budget_ms=args.budget_ms,
              threads=args.threads or 1, seq=args.seq, preset=args.preset,
              controllers=tuple(c.strip() for c in args.controllers.split(",") if c.strip()),
              max_mb=args.max_mb, max_mem_mb=args.max_mem_mb,
              latency_db=Path(args.latency_db) if args.latency_db else None, backend=args.latency_backend,
              precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()), seed=args.seed,
              speedup=args.speedup, device=args.device,
              seq_choices=_ints(args.seq_choices, "--seq-choices") if args.seq_choices else None)
    result = run(job, resume=args.resume, progress=True)
    if not args.json:
        print(f"chosen {result['arch']}: F1 {result['f1']:.2f}, p50 {result['median_ms']:.2f} ms, "
              f"p95 {result['p95_ms']:.2f} ms (budget {result['budget_ms']} ms); report: {result['paths']['report']}",
              file=sys.stdout)
    return result


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from ..errors import CanaoError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CanaoError(f"{flag} {text!r}: give whole numbers separated by commas, e.g. 256,384") from None
