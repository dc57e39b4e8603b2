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
    p.add_argument("--preset", choices=["quick", "standard", "full"], default="quick",
                   help="quick: minutes, no supernet; standard: ~2 h on 2 CPU cores with a supernet; full: a GPU")
    p.add_argument("--supernet", default=None,
                   help="a trained supernet folder (canao supernet train) to search in; a later search of the same "
                        "teacher with another budget reuses it and costs minutes")
    p.add_argument("--shared-embeddings", default=None, metavar="MODEL",
                   help="students refer to this built-in model's word-embedding table (e.g. minilm) instead of "
                        "storing their own: much smaller model files")
    p.add_argument("--phase2-minutes", type=float, default=None,
                   help="distillation time of the chosen model (the baselines get the same steps); default: the "
                        "preset's (quick 2.5, standard 25). With --supernet, a few minutes make a second budget cheap")
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

    sp = sub.add_parser("supernet", help="train a weight-sharing supernet of a teacher, reused by every search")
    ssub = sp.add_subparsers(dest="supernet_command", required=True, metavar="ACTION")
    t = ssub.add_parser("train", help="augment the data, cache the teacher's outputs, train the supernet (resumable)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--teacher", required=True, help="teacher checkpoint folder (BERT-family QA model)")
    t.add_argument("--task", default="squad", choices=["squad"])
    t.add_argument("--data", required=True, help="data folder laid out like ../shared/data")
    t.add_argument("--out", required=True, help="output folder (supernet.json, model.safetensors)")
    t.add_argument("--preset", choices=["quick", "standard", "full"], default="standard",
                   help="quick: minutes; standard: ~75 min of training on 2 CPU cores; full: a GPU")
    t.add_argument("--minutes", type=float, default=None, help="training time (fits the step count to it)")
    t.add_argument("--steps", type=int, default=None, help="training steps (without --minutes: exactly these)")
    t.add_argument("--shared-embeddings", default=None, metavar="MODEL",
                   help="train with this built-in model's word-embedding table (e.g. minilm), so that students can "
                        "refer to it instead of storing it")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--seed", type=int, default=0)
    add_common(t)
    t.set_defaults(func=cmd_supernet_train)

    from .further import register_distill

    register_distill(sub)


def cmd_search(args) -> dict:
    import sys

    from ..errors import CanaoError
    from .pipeline import Job, run

    if args.phase2_minutes is not None and not args.phase2_minutes > 0:
        raise CanaoError(f"--phase2-minutes must be > 0, got {args.phase2_minutes}")
    overrides = {} if args.phase2_minutes is None else {"phase2_seconds": args.phase2_minutes * 60}
    job = Job(teacher=Path(args.teacher), data=Path(args.data), out=Path(args.out), budget_ms=args.budget_ms,
              threads=args.threads or 1, seq=args.seq, preset=args.preset,
              controllers=tuple(c.strip() for c in args.controllers.split(",") if c.strip()),
              max_mb=args.max_mb, max_mem_mb=args.max_mem_mb,
              latency_db=Path(args.latency_db) if args.latency_db else None, backend=args.latency_backend,
              precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()), seed=args.seed,
              speedup=args.speedup, device=args.device, supernet=Path(args.supernet) if args.supernet else None,
              shared_embeddings=args.shared_embeddings,
              seq_choices=_ints(args.seq_choices, "--seq-choices") if args.seq_choices else None,
              overrides=overrides)
    result = run(job, resume=args.resume, progress=True)
    if not args.json:
        print(f"chosen {result['arch']}: F1 {result['f1']:.2f}, p50 {result['median_ms']:.2f} ms, "
              f"p95 {result['p95_ms']:.2f} ms (budget {result['budget_ms']} ms); report: {result['paths']['report']}",
              file=sys.stdout)
    return result


def cmd_supernet_train(args) -> dict:
    import sys

    from .supernet_train import SupernetJob, train

    overrides = {}
    if args.minutes is not None:
        overrides["seconds"] = args.minutes * 60
    if args.steps is not None:
        overrides["steps"] = args.steps
        overrides.setdefault("seconds", None)
    job = SupernetJob(Path(args.teacher), Path(args.data), Path(args.out), preset=args.preset, overrides=overrides,
                      shared_embeddings=args.shared_embeddings, seed=args.seed, threads=args.threads)
    result = train(job, resume=args.resume, progress=True)
    if not args.json:
        ref = result["reference"]["subnets"]
        print(f"supernet in {result['out']}: {result['training']['steps']} steps in {result['training']['train_s']:.0f} s; "
              + ", ".join(f"{k} F1 {v['f1']:.1f}" for k, v in ref.items()), file=sys.stdout)
    return result


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from ..errors import CanaoError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CanaoError(f"{flag} {text!r}: give whole numbers separated by commas, e.g. 256,384") from None
