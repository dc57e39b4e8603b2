"""Searched students against the teacher on other engines: one interleaved latency run, F1 on the
whole dev file, a Pareto plot and the paper's table (speedup over TFLite fp32 and F1 loss per budget).

    python benchmarks/students_pareto.py --teacher ../shared/models/minilm-l6-h384-squad --data ../shared/data \
        --searches runs/search-standard-2x,docs/results/search-standard-4x,docs/results/search-standard-8x,runs/search-standard-12x \
        --students minilm-squad-4x,minilm-squad-8x --distilled docs/results/distill-8x-width-shrunk@8x \
        --threads 1 --runs 30 --out benchmarks/results/students_pareto

Engines, all at batch 1 with the input padded to 384 tokens (as TFLite QA apps run), on the same
random tokens, interleaved run by run after warm-up: the teacher on TFLite (XNNPACK) fp32 and int8
(ai-edge-quantizer dynamic_wi8_afp32), on ONNX Runtime int8 (quantize_dynamic) and compiled by
canao in fp32 and int8; every search's returned student, CANAO's own model where a baseline was
returned instead, and its width-shrunk and layer-dropped baselines, each through its compiled
artifact. Speedups are ratios of medians from this run. F1: the searches' figures on the whole dev
file (compiled models); the teacher's int8 points on TFLite and ONNX Runtime are scored here on the
same file (TFLite fp32 equals the PyTorch teacher to 1e-5, so its F1 is the teacher's).

A search folder whose artifacts are gone (the records kept in docs/results hold state.json only) is
timed from its architectures: each is compiled with random weights at its precision, which times the
same code (dense kernels: the time does not depend on the weights' values); such rows say "timed
from the architecture". `--students` adds shipped students (compiled from their files, F1 from their
export records) and `--distilled` runs of `canao distill` (F1 from their eval-int8.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from canao.compiler import compile_model  # noqa: E402
from canao.baselines.encoder_engines import CanaoEngine, OnnxRuntimeEngine, TFLiteEngine  # noqa: E402
from canao.compiler.targets import cpu_model  # noqa: E402
from canao.compress.space import Arch  # noqa: E402
from canao.models.bert import BertForQuestionAnswering  # noqa: E402
from canao.models.encoders import load_encoder  # noqa: E402

SEQ = 384


def Artifact(path: Path, threads: int) -> CanaoEngine:
    """canao's engine on a compiled artifact, at the artifact's own precision."""
    eng = CanaoEngine(None, None, path)
    eng.prepare(threads)
    return eng


def p95(ts):
    return float(np.percentile(ts, 95))


def models_of(search: Path) -> tuple[list[dict], dict]:
    st = json.loads((search / "state.json").read_text())
    budget = st["job"]["budget_ms"]
    label = f"{st['job']['speedup']:g}x" if st["job"].get("speedup") else f"{budget} ms"
    returned = (st.get("returned") or {}).get("name")
    base = {"search": str(search), "budget": label, "budget_ms": budget}
    out = []
    fin = st.get("final")
    if fin and fin.get("f1") is not None:
        out.append({**base, "kind": "CANAO", "returned": returned == "canao", "key": fin["key"], "f1": fin["f1"],
                    "f1_heldout": fin.get("f1_heldout"), "artifact": fin.get("artifact")})
    for name, b in st.get("baselines", {}).items():
        if b.get("key") and b.get("f1") is not None:
            out.append({**base, "kind": name, "returned": returned == name, "key": b["key"], "f1": b["f1"],
                        "f1_heldout": b.get("f1_heldout"), "artifact": b.get("artifact")})
    return out, st


def shipped_students(names: list[str]) -> list[dict]:
    from canao.paths import resolve_model_path

    out = []
    for name in names:
        folder = resolve_model_path(name)
        rec = json.loads((folder / "canao-student.json").read_text())
        arch = Arch.from_dict(rec["arch"])
        label = f"{rec['speedup']:g}x" if rec.get("speedup") else f"{rec['budget_ms']} ms"
        out.append({"search": rec.get("search"), "budget": label, "budget_ms": rec.get("budget_ms"),
                    "kind": f"shipped {name}", "returned": False, "key": arch.key(),
                    "f1": rec["f1_compiled"]["f1"], "f1_heldout": rec["f1_compiled"].get("f1_heldout"),
                    "weights": str(folder)})
    return out


def distilled_runs(folders: list[str]) -> list[dict]:
    """Each item is FOLDER or FOLDER@LABEL (the budget it is compared at, e.g. 8x)."""
    out = []
    for item in folders:
        folder, _, label = item.partition("@")
        folder = Path(folder)
        rec = json.loads((folder / "distill.json").read_text())
        scored = json.loads((folder / "eval-int8.json").read_text())
        out.append({"search": str(folder), "budget": label or folder.name, "budget_ms": None,
                    "kind": f"distilled {folder.name}", "returned": False, "key": rec["arch"],
                    "f1": scored["f1"], "f1_heldout": scored.get("f1_heldout"), "artifact": None})
    return out


def artifact_for(entry: dict, teacher, tmp: Path, threads: int) -> Path:
    """The entry's own artifact if it still exists; else its weights, else its architecture with
    random weights, compiled at the architecture's precision."""
    if entry.get("artifact") and (Path(entry["artifact"]) / "manifest.json").exists():
        return Path(entry["artifact"])
    arch = Arch.parse(entry["key"])
    if entry.get("weights"):
        model, _ = load_encoder(entry["weights"])
    else:
        torch.manual_seed(0)
        model = BertForQuestionAnswering(arch.bert_config(teacher.config)).eval()
        entry["timed_from"] = "the architecture (random weights)"
    out = tmp / f"student-{len(list(tmp.iterdir()))}"
    compile_model(model, out, precision=arch.precision, max_seq=SEQ, threads=threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--searches", required=True, help="comma-separated search output folders")
    ap.add_argument("--students", default="", help="comma-separated shipped students (zoo names)")
    ap.add_argument("--distilled", default="", help="comma-separated canao distill folders with eval-int8.json, each FOLDER[@BUDGET-LABEL]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--engines", default="tflite,onnxruntime", help="other engines of the teacher (tflite, onnxruntime)")
    ap.add_argument("--known-f1", default="", help="ENGINE=F1,...: the int8 teacher's F1 on another engine, "
                    "already measured on the whole dev file (not scored again)")
    ap.add_argument("--out", required=True, help="output path prefix (.json, .md, .png)")
    args = ap.parse_args()
    if args.runs < 20:
        sys.exit("use at least 20 runs")
    teacher, tok = load_encoder(args.teacher)
    entries, states = [], []
    for folder in args.searches.split(","):
        models, st = models_of(Path(folder))
        entries += models
        states.append(st)
    entries += shipped_students([n for n in args.students.split(",") if n])
    entries += distilled_runs([d for d in args.distilled.split(",") if d])
    teacher_f1 = states[0]["teacher"]["f1"]
    tmp = Path(tempfile.mkdtemp(prefix="canao-pareto-"))
    engines = {}
    try:
        for prec in ("fp32", "int8"):
            compile_model(teacher, tmp / f"teacher-{prec}", precision=prec, max_seq=SEQ, threads=args.threads)
            engines[f"teacher canao {prec}"] = Artifact(tmp / f"teacher-{prec}", args.threads)
        others = args.engines.split(",")
        if "tflite" in others:
            for prec in ("fp32", "int8"):
                eng = TFLiteEngine(teacher, prec)
                eng.setup(SEQ)
                eng.prepare(args.threads)
                engines[f"teacher TFLite {prec}"] = eng
        if "onnxruntime" in others:
            eng = OnnxRuntimeEngine(teacher, "int8")
            eng.prepare(args.threads)
            engines["teacher ONNX Runtime int8"] = eng
        for e in entries:
            engines[f"{e['budget']} {e['kind']}"] = Artifact(artifact_for(e, teacher, tmp, args.threads), args.threads)
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, teacher.config.vocab_size, (1, SEQ)).astype(np.int64)
        tt = np.zeros_like(ids)
        tt[:, SEQ // 4:] = 1
        mask = np.ones_like(ids)
        for eng in engines.values():
            for _ in range(args.warmup):
                eng.time_ms(ids, tt, mask)
        times = {k: [] for k in engines}
        for _ in range(args.runs):
            for k, eng in engines.items():  # interleaved: load from elsewhere hits every engine alike
                times[k].append(eng.time_ms(ids, tt, mask))
        lat = {k: {"median_ms": statistics.median(v), "p95_ms": p95(v)} for k, v in times.items()}
        for eng in engines.values():
            eng.close()
        # F1 of the int8 teacher on the other engines, whole dev file
        from canao.compress.external import int8_teacher_points
        from canao.compress.search import eval_stride
        from canao.tasks import squad

        dev = squad.read_squad(Path(args.data) / "squad" / "dev-v1.1.json")
        feats = squad.make_features(tok, dev, SEQ, eval_stride(SEQ))
        known = dict(item.split("=", 1) for item in args.known_f1.split(",") if item)
        points = int8_teacher_points(teacher, dev, feats, SEQ, args.threads, runs=20,
                                     engines=tuple(e for e in others if e not in known),
                                     log=lambda m: print(m, file=sys.stderr))
        for engine, f1 in known.items():  # scored before on the same file (say where in the report)
            points[f"teacher-int8-{engine}"] = {"f1": float(f1), "given": True}
        canao_int8_f1 = next((st["baselines"]["teacher-int8"]["f1"] for st in states
                              if st.get("baselines", {}).get("teacher-int8", {}).get("f1") is not None), None)
        if canao_int8_f1 is None:  # no search scored it (over their budgets): score it here
            from canao.compress.oracle import artifact_runner

            run, close = artifact_runner(tmp / "teacher-int8", args.threads)
            try:
                canao_int8_f1 = squad.score(run, dev, feats)[0]["f1"]
            finally:
                close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = lat["teacher TFLite fp32"]["median_ms"] if "teacher TFLite fp32" in lat else None
    canao_fp32 = lat["teacher canao fp32"]["median_ms"]
    rows = []
    f1_of = {"teacher canao fp32": teacher_f1, "teacher TFLite fp32": teacher_f1,
             "teacher canao int8": canao_int8_f1,
             "teacher TFLite int8": points.get("teacher-int8-tflite", {}).get("f1"),
             "teacher ONNX Runtime int8": points.get("teacher-int8-onnxruntime", {}).get("f1")}
    for k in lat:
        e = next((e for e in entries if f"{e['budget']} {e['kind']}" == k), None)
        f1 = e["f1"] if e else f1_of.get(k)
        rows.append({"name": k, **(e or {}), "f1": f1, **lat[k],
                     "speedup_vs_tflite_fp32": ref / lat[k]["median_ms"] if ref else None,
                     "speedup_vs_canao_fp32_teacher": canao_fp32 / lat[k]["median_ms"],
                     "f1_loss": None if f1 is None else teacher_f1 - f1})
    report = {"cpu": cpu_model(), "threads": args.threads, "seq": SEQ, "runs": args.runs, "teacher_f1": teacher_f1,
              "dev_questions": len(dev), "rows": rows, "int8_points": points,
              "note": "latency: batch 1 padded to 384 tokens, interleaved, median/p95 of the runs; F1: whole dev file"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))


def markdown(r: dict) -> str:
    lines = [f"CPU: {r['cpu']}, {r['threads']} thread(s), batch 1 padded to {r['seq']} tokens, {r['runs']} interleaved "
             f"runs; F1 on the {r['dev_questions']} dev questions (teacher {r['teacher_f1']:.2f}).", "",
             "| model | arch | F1 | F1 loss | median ms | p95 ms | speedup vs TFLite fp32 | vs canao fp32 teacher |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        f1 = "-" if row["f1"] is None else f"{row['f1']:.2f}"
        loss = "-" if row["f1_loss"] is None else f"{row['f1_loss']:+.2f}"
        sp = "-" if row["speedup_vs_tflite_fp32"] is None else f"{row['speedup_vs_tflite_fp32']:.2f}x"
        name = row["name"] + (" (returned)" if row.get("returned") else "") + (" ¹" if row.get("timed_from") else "")
        lines.append(f"| {name} | {row.get('key', '-')} | {f1} | {loss} | {row['median_ms']:.2f} | {row['p95_ms']:.2f} | "
                     f"{sp} | {row['speedup_vs_canao_fp32_teacher']:.2f}x |")
    if any(row.get("timed_from") for row in r["rows"]):
        lines += ["", "¹ Timed from the architecture: compiled with random weights at its precision (the search's "
                  "artifact is gone; dense kernels take the same time whatever the weights' values)."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    key = "speedup_vs_tflite_fp32" if r["rows"][0]["speedup_vs_tflite_fp32"] else "speedup_vs_canao_fp32_teacher"
    styles = {"CANAO": ("*", "tab:red", 160), "width-shrunk": ("o", "tab:blue", 50), "layer-dropped": ("s", "tab:green", 50)}
    canao = sorted((row[key], row["f1"]) for row in r["rows"] if row.get("kind") == "CANAO")
    if canao:
        ax.plot(*zip(*canao), color="tab:red", lw=1)
    for row in r["rows"]:
        if row["f1"] is None:
            continue
        kind = row.get("kind")
        if kind in styles:
            m, c, s = styles[kind]
            ax.scatter([row[key]], [row["f1"]], marker=m, color=c, s=s,
                       label=kind if kind not in ax.get_legend_handles_labels()[1] else None)
            ax.annotate(row["budget"], (row[key], row["f1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        else:
            ax.scatter([row[key]], [row["f1"]], marker="^", s=60, label=row["name"])
    ax.axhline(r["teacher_f1"], color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over the teacher on " + ("TFLite fp32" if "tflite" in key else "canao fp32")
                  + f" (median, batch 1, {r['seq']} tokens, {r['threads']} thread)")
    ax.set_ylabel(f"F1, SQuAD dev ({r['dev_questions']} questions)")
    ax.set_title("Students against the teacher on other engines")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
