"""Search outputs: the JSONL log (written by search.py as it goes), a Pareto plot of F1
against latency with the teacher and the baselines on it, and a markdown report."""

from __future__ import annotations

from pathlib import Path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(latency, f1) points not dominated by a faster-and-better one, by latency."""
    front, best = [], float("-inf")
    for lat, f1 in sorted(points):
        if f1 > best:
            front.append((lat, f1))
            best = f1
    return front


def plot(out: Path, state: dict, entries: list[dict], budget_ms: float) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"rl": "tab:blue", "evolution": "tab:green", "random": "tab:gray", "anchor": "tab:orange"}
    for name, color in colors.items():
        pts = [(e["measured"]["p95_ms"] if e.get("measured") else e["predicted_ms"], e["f1"]) for e in entries
               if e.get("controller") == name and e.get("f1") is not None]
        if pts:
            ax1.scatter(*zip(*pts), s=12, alpha=0.6, color=color, label=f"{name} candidates")
    allpts = [(e["measured"]["p95_ms"] if e.get("measured") else e["predicted_ms"], e["f1"]) for e in entries
              if e.get("f1") is not None and e.get("feasible")]
    if allpts:
        ax1.plot(*zip(*pareto_front(allpts)), color="tab:red", lw=1, label="Pareto front (feasible)")
    ax1.axvline(budget_ms, color="k", ls="--", lw=1, label=f"budget {budget_ms} ms")
    ax1.set_xlabel("p95 latency, ms (measured where measured, else predicted)")
    ax1.set_ylabel("supernet sub-network F1, search slice")
    ax1.set_title("Phase 1: candidates")
    ax1.legend(fontsize=7)
    # final models, on the held-out eval slice
    fin = state.get("final")
    if fin:
        ax2.scatter([fin["p95_ms"]], [fin["f1"]], marker="*", s=200, color="tab:red", label=f"CANAO {fin['key']}")
    t, tl = state.get("teacher"), state.get("teacher_latency")
    if t and tl:
        ax2.scatter([tl["p95_ms"]], [t["f1"]], marker="s", s=60, color="k", label="teacher (canao fp32)")
    for name, b in state.get("baselines", {}).items():
        if "p95_ms" in b and "f1" in b:
            ax2.scatter([b["p95_ms"]], [b["f1"]], marker="o", s=60, label=f"{name} {b['key']}")
    for name, b in state.get("external_baselines", {}).items():
        if "p95_ms" in b:
            ax2.scatter([b["p95_ms"]], [b["f1"]], marker="^", s=60, label=name)
    ax2.axvline(budget_ms, color="k", ls="--", lw=1)
    ax2.set_xlabel("measured p95 latency, ms (batch 1, padded to seq)")
    ax2.set_ylabel("F1, dev questions of the report")
    ax2.set_title("Final models")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(state: dict, job) -> str:
    fin, t, tl = state.get("final", {}), state.get("teacher", {}), state.get("teacher_latency", {})
    cal = state.get("calibration", {})
    lines = [f"# CANAO search: budget {job.budget_ms} ms p95, seq {job.seq}, {job.threads} thread(s), preset {job.preset}", ""]
    if fin:
        held = (f", {fin['f1_heldout']:.2f} on the {fin['heldout_questions']} of them no choice was made on"
                if fin.get("f1_heldout") is not None else "")
        lines += [f"**CANAO**: `{fin['key']}` — F1 {fin['f1']:.2f} (compiled model, {t.get('eval_questions')} dev "
                  f"questions{held}), measured p50 {fin['median_ms']:.2f} ms / p95 {fin['p95_ms']:.2f} ms "
                  f"({'within' if fin['p95_ms'] <= job.budget_ms else 'OVER'} budget); verify max |diff| "
                  f"{fin['verify']['max_abs_diff']:.1e}.", ""]
    ret = state.get("returned")
    if ret:
        lines += [f"**Returned**: `{ret['key']}` ({ret['name']}): {ret['why']}.", ""]
    p2 = state.get("phase2")
    if p2:
        lines += [f"Phase 2 started from the {p2['start']} weights (selection-slice F1 "
                  + ", ".join(f"{k} {v:.2f}" for k, v in p2["start_f1"].items())
                  + f"), {p2['steps']} steps in {p2['train_s']:.0f} s on {p2['train_windows']} cached windows; best "
                  f"selection-slice F1 {p2['best']['f1']:.2f} at step {p2['best']['step']}.", ""]
        pq = fin.get("per_question")
        if pq:
            lines += [f"Per question at real lengths (mean {pq['mean_len']:.0f} tokens): p50 {pq['median_ms']:.2f} ms, "
                      f"p95 {pq['p95_ms']:.2f} ms.", ""]
    def pq_cell(p):
        return f"{p['median_ms']:.2f}" if p else "-"

    def f1_cell(b, key="f1"):
        return f"{b[key]:.2f}" if b.get(key) is not None else "-"

    lines += ["| model | arch | F1 | F1 held-out | F1 selection slice | p50 ms | p95 ms | per question p50 ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if fin:
        lines.append(f"| CANAO | `{fin['key']}` | {fin['f1']:.2f} | {f1_cell(fin, 'f1_heldout')} | "
                     f"{f1_cell(fin, 'f1_select')} | {fin['median_ms']:.2f} | {fin['p95_ms']:.2f} | "
                     f"{pq_cell(fin.get('per_question'))} |")
    if t and tl:
        lines.append(f"| teacher | largest, canao fp32 | {t['f1']:.2f} | {f1_cell(t, 'f1_heldout')} | - | "
                     f"{tl['median_ms']:.2f} | {tl['p95_ms']:.2f} | - |")
    for name, b in state.get("baselines", {}).items():
        if b.get("same_as") == "canao":  # the same shape from the same start: trained once
            lines.append(f"| {name} | `{b['key']}`: CANAO's model (same architecture and start) | | | | | | |")
            continue
        lines.append(f"| {name} | `{b['key']}` | {f1_cell(b)} | {f1_cell(b, 'f1_heldout')} | {f1_cell(b, 'f1_select')} | "
                     f"{b.get('median_ms', float('nan')):.2f} | {b.get('p95_ms', float('nan')):.2f} | "
                     f"{pq_cell(b.get('per_question'))}{'' if b.get('within_budget', True) else ' (over budget)'} |")
    for name, b in state.get("external_baselines", {}).items():
        if "p95_ms" in b:
            lines.append(f"| {name} | teacher, {b.get('version', b.get('engine'))} | {b['f1']:.2f} | - | - | "
                         f"{b['median_ms']:.2f} | {b['p95_ms']:.2f} | {pq_cell(b.get('per_question'))} |")
        else:
            lines.append(f"| {name} | skipped: {b.get('skipped')} | | | | | | |")
    lines += ["", "## Latency predictor", ""]
    h = cal.get("holdout")
    if h:
        med = h.get("median")
        lines.append(f"Per-precision model of per-layer costs plus per-choice corrections, fitted on {cal.get('measured')} "
                     f"compiled candidates ({cal.get('backend')}); held-out error of the p95 {h['mape_pct']:.2f} % "
                     f"({h['mae_ms']:.2f} ms MAE, worst {h['max_pct']:.1f} %) on {h['n']} candidates"
                     + (f"; of the median {med['mape_pct']:.2f} % (worst {med['max_pct']:.1f} %)." if med else "."))
    s = state.get("search", {})
    lines += ["", "## Controllers", "", "| controller | best F1 (search slice) | candidates to best | evaluated |",
              "| --- | --- | --- | --- |"]
    for name, c in s.get("controllers", {}).items():
        bf = "-" if c["best_f1"] is None else f"{c['best_f1']:.2f}"
        lines.append(f"| {name} | {bf} | {c['candidates_to_best']} | {c['evaluated']} |")
    sup = state.get("supernet", {})
    tr = sup.get("training") or {}
    phase1 = (f"supernet {sup.get('folder')}: {tr.get('steps')} training steps in {tr.get('train_s', 0):.0f} s on "
              f"{tr.get('device', '?')}" if sup.get("steps") != 0
              else "no supernet training (this preset ranks slices of the importance-ordered teacher)")
    lines += ["", f"Search time {s.get('search_s', 0):.0f} s (F1 evaluation {s.get('eval_s', 0):.0f} s); {phase1}; "
              f"phase 2 {state.get('phase2', {}).get('train_s', 0):.0f} s.",
              "", "Confirmation (measured in order of F1; the first within budget is taken):", ""]
    for c in state.get("confirm", []):
        lines.append(f"- `{c['key']}`: F1 {c['f1']:.2f}, predicted {c['predicted_ms']:.2f} ms, measured p95 "
                     f"{c['p95_ms']:.2f} ms -> {'taken' if c['within_budget'] else 'over budget, next'}")
    for k in state.get("rejected", []):
        lines.append(f"- `{k}`: compiled and trained model measured over budget, next candidate taken")
    lines += ["", "Files: `model/` (Hugging Face layout), `artifact/` (compiled), `search-log.jsonl`, `pareto.png`, "
              "`predictor.json`, `state.json`.", "",
              "Latency: batch 1, padded to the sequence length, median and p95 over repeated runs after warm-up, "
              "on a machine that may be shared (noise shows as p95 above p50)."]
    return "\n".join(lines) + "\n"


def write_all(out: Path, state: dict, entries: list[dict], job) -> dict:
    out = Path(out)
    files = {"log": str(out / "search-log.jsonl")}
    png = plot(out, state, entries, job.budget_ms)
    if png:
        files["pareto"] = str(png)
    (out / "report.md").write_text(markdown(state, job))
    files["report"] = str(out / "report.md")
    return files
