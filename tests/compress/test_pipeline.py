"""The whole `canao search` on tiny slices (seconds, not minutes): stages, resume, the guarantee."""

import json

import pytest

from canao.compress.pipeline import Job, run
from canao.compress.teacher_cache import WindowSettings
from canao.errors import CanaoError

TINY = dict(search_dev=6, select_dev=6, choose_dev=4, eval_dev=20, calibration=4, proposals=3, phase2_steps=2, phase2_seconds=None,
            eval_every=0, batch_size=4, runs=3, rounds=2, hidden_fracs=(0.5, 1.0),  # the hidden width searched too
            repair_windows=8,  # teacher slices refit on 8 calibration windows
            baselines=("width-shrunk", "layer-dropped"), external=("onnxruntime",))  # the quick preset's are fewer
# the distillation data (and, in the standard preset, the supernet): 16 questions and one augmented copy each
SUPER_TINY = dict(train_limit=16, copies=1, window=WindowSettings(128, 32), importance_batches=1, steps=4, seconds=None,
                  batch_size=4, reference_dev=6, save_every=2)


def job(tmp_path, teacher_dir, data_dir, budget=None, out="out", **kw):
    return Job(teacher=teacher_dir, data=data_dir, out=tmp_path / out, budget_ms=budget, threads=1, seq=128,
               backend="torch", latency_db=tmp_path / "db.json", overrides=dict(TINY, **kw.pop("over", {})),
               supernet_overrides=SUPER_TINY, **kw)


def test_search_end_to_end_and_resume(tmp_path, teacher_dir, data_dir):
    res = run(job(tmp_path, teacher_dir, data_dir, speedup=1.5, seq_choices=(96, 128)), progress=False)
    out = tmp_path / "out"
    # --speedup: the budget is the teacher's measured p95 / 1.5, and the chosen model meets it
    assert res["budget_ms"] == pytest.approx(res["teacher"]["p95_ms"] / 1.5, abs=0.01)
    assert res["p95_ms"] <= res["budget_ms"] and res["within_budget"]
    assert (out / "model" / "config.json").exists() and (out / "artifact").exists()
    from canao.apps.qa import QAPipeline  # the artifact carries the tokenizer: `canao qa --model OUT/artifact`

    qa = QAPipeline.load(str(out / "artifact"))
    assert qa.info["max_seq"] == res["arch"]["seq"] in (96, 128)
    assert qa.answer("Ada wrote it in 1843.", "When did Ada write it?")["windows"] == 1
    assert (out / "pareto.png").exists() and (out / "report.md").exists()
    log = [json.loads(line) for line in (out / "search-log.jsonl").read_text().splitlines()]
    cands = [e for e in log if e["type"] == "candidate"]
    assert len([e for e in cands if e["controller"] in ("rl", "evolution", "random")]) == 9
    # "fit": a confirmed candidate that measured over the budget, shrunk (timing noise decides whether one is)
    assert {"rl", "evolution", "random", "anchor"} <= {e["controller"] for e in cands} <= {"rl", "evolution", "random",
                                                                                          "anchor", "fit"}
    assert all("predicted_ms" in e and "reward" in e for e in cands)
    assert any(e["arch"].get("hidden") == 192 for e in cands)  # narrow residual streams were proposed
    assert {e["arch"]["seq"] for e in cands} == {96, 128}  # and shorter maximum lengths
    assert any(e["type"] == "confirm" and e["within_budget"] for e in log)
    assert set(res["baselines"]) == {"layer-dropped", "width-shrunk"} and res["teacher"]["f1"] > 0
    ort = res["external_baselines"]["teacher-int8-onnxruntime"]  # the quick preset's int8 reference point
    assert abs(ort["f1"] - res["teacher"]["f1"]) < 10 and 0 < ort["median_ms"] <= ort["p95_ms"]
    assert "teacher-int8-onnxruntime" in (out / "report.md").read_text()
    assert res["predictor"]["n"] >= 1
    state = json.loads((out / "state.json").read_text())
    assert state["phase2"]["steps"] == 2 and state["phase2"]["start"] == "teacher-slices"
    assert state["phase2"]["repair"]["windows"] == 8  # the slices were refit before phase 2
    assert {b["steps"] for b in state["baselines"].values() if "steps" in b} == {2}  # the baselines got the same
    assert state["phase2"]["best"]["f1"] == max(e["f1"] for e in state["phase2"]["evals"])  # kept the best
    # never below an in-budget baseline on the choice slice (selection + 4 further questions)
    pool = [state["final"]] + [b for b in state["baselines"].values() if b.get("within_budget") and "f1_select" in b]
    assert state["returned"]["by"] == "f1_choose" and state["final"]["choose_questions"] == 10
    assert state["returned"]["f1_choose"] == max(b["f1_choose"] for b in pool)
    assert state["final"]["heldout_questions"] == 4  # the eval questions after search, selection and choice
    assert res["f1"] > 0 and res["eval_questions"] == 20
    # a finished run resumes without redoing anything
    with pytest.raises(CanaoError, match="--resume"):
        run(job(tmp_path, teacher_dir, data_dir, speedup=1.5, seq_choices=(96, 128)), progress=False)
    with pytest.raises(CanaoError, match="same settings"):
        run(job(tmp_path, teacher_dir, data_dir, 500.0), resume=True, progress=False)
    again = run(job(tmp_path, teacher_dir, data_dir, speedup=1.5, seq_choices=(96, 128)), resume=True, progress=False)
    assert again["arch"] == res["arch"] and again["f1"] == res["f1"]
    assert len((out / "search-log.jsonl").read_text().splitlines()) == len(log)


def test_a_baseline_identical_to_canaos_model_is_not_trained_twice(tmp_path, teacher_dir, data_dir):
    from canao.compress.pipeline import PRESETS

    assert PRESETS["quick"].baselines == ("width-shrunk",)  # the main job trains one baseline
    # a budget the teacher's shape meets: the only candidate (both anchors are the teacher's shape) is
    # CANAO's model, and the width-shrunk baseline would repeat its training from the same teacher slices
    res = run(job(tmp_path, teacher_dir, data_dir, 400.0, controllers=(), over=dict(baselines=("width-shrunk",), external=())),
              progress=False)
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    base = state["baselines"]["width-shrunk"]
    assert set(state["baselines"]) == {"width-shrunk"} and base["key"] == state["final"]["key"]
    assert base["same_as"] == "canao" and base["steps"] == state["phase2"]["steps"] and base["f1"] == res["f1"]
    assert not (tmp_path / "out" / "baseline-width-shrunk").exists() and state["returned"]["name"] == "canao"


def test_a_compiled_model_that_loses_f1_is_rejected_and_the_next_candidate_trained(tmp_path, teacher_dir, data_dir,
                                                                                    monkeypatch):
    import numpy as np

    from canao.compress import pipeline

    real, calls = pipeline.artifact_runner, []

    def first_one_broken(path, threads):  # the first compiled model answers with flat logits: F1 near 0
        calls.append(str(path))
        run_fn, close = real(path, threads)
        if len(calls) > 1:
            return run_fn, close
        return (lambda *a: tuple(np.zeros_like(x) for x in run_fn(*a))), close

    monkeypatch.setattr(pipeline, "artifact_runner", first_one_broken)
    # the anchors and three random candidates, all within a generous budget
    res = run(job(tmp_path, teacher_dir, data_dir, 400.0, controllers=("random",), over=dict(baselines=(), external=())),
              progress=False)
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert len(state["rejected"]) == 1 and state["final"]["key"] != state["rejected"][0]
    assert res["arch"] == state["final"]["arch"] and res["f1"] > 5  # the second one, trained and compiled intact
    assert not any(p.name == f"artifact-{state['rejected'][0]}" for p in (tmp_path / "out").iterdir())


def test_training_without_the_target_then_the_device_stages_on_it(tmp_path, teacher_dir, data_dir):
    """scripts/device_search.sh: a GPU machine trains with a predictor fitted on the target (measure=False),
    then `--resume` on the target measures, compiles and reports without training again."""
    from canao.compress.predictor import LatencyPredictor
    from canao.models.bert import BertConfig

    arch = lambda d: {"heads": [12] * d, "ffn": [1536] * d, "seq": 128, "precision": "fp32"}  # noqa: E731
    pred = LatencyPredictor(BertConfig())  # any fitted predictor will do: the budget below fits every candidate
    from canao.compress.space import Arch

    pred.fit([(Arch.from_dict(arch(d)), {"median_ms": 5.0 * d, "p95_ms": 5.5 * d}) for d in (1, 2, 4, 6)])
    (tmp_path / "predictor.json").write_text(json.dumps({"predictor": pred.to_dict()}))
    over = dict(baselines=("width-shrunk",), external=())
    trained = run(job(tmp_path, teacher_dir, data_dir, 400.0, controllers=(), measure=False,
                      predictor_file=tmp_path / "predictor.json", over=over), progress=False)
    state = trained["state"]
    assert "stopped" in state and "final" not in state and state["phase2"]["steps"] == 2
    assert set(state["baseline_partial"]) == {"width-shrunk"} and (tmp_path / "out" / "model" / "config.json").exists()
    done = run(job(tmp_path, teacher_dir, data_dir, 400.0, controllers=(), over=over), resume=True, progress=False)
    final = json.loads((tmp_path / "out" / "state.json").read_text())
    assert done["within_budget"] and final["phase2"]["train_s"] == state["phase2"]["train_s"]  # not trained again
    base = final["baselines"]["width-shrunk"]  # trained on the GPU machine, compiled and measured on the target
    assert base["steps"] == 2 and base["p95_ms"] > 0 and (tmp_path / "out" / "baseline-width-shrunk" /
                                                         f"artifact-{base['key']}").exists()


def test_standard_preset_trains_a_supernet_that_a_second_search_reuses(tmp_path, teacher_dir, data_dir):
    from canao.models.encoders import load_encoder

    first = run(job(tmp_path, teacher_dir, data_dir, 400.0, preset="standard", shared_embeddings="minilm",
                    over=dict(hidden_fracs=(0.5, 0.75, 1.0))), progress=False)
    sup = tmp_path / "out" / "supernet"
    meta = json.loads((sup / "supernet.json").read_text())
    assert meta["training"]["steps"] == 4 and meta["shared_embeddings"] == "minilm"
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert state["supernet"]["folder"] == str(sup) and set(state["phase2"]["start_f1"]) == {"supernet", "teacher-slices"}
    assert first["within_budget"]
    # the student refers to all-MiniLM's word-embedding table instead of storing it, and loads with it
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model" / "model.safetensors"), "pt") as f:
        assert not any("word_embeddings" in k for k in f.keys())
    model, _ = load_encoder(tmp_path / "out" / "model")
    assert model.bert.embeddings.word_embeddings.weight.shape[0] == 30522
    stamp = (sup / "model.safetensors").stat().st_mtime_ns
    second = run(job(tmp_path, teacher_dir, data_dir, 300.0, out="out2", preset="standard", supernet=sup),
                 progress=False)
    assert (sup / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    assert second["within_budget"] and second["budget_ms"] == 300.0
    state2 = json.loads((tmp_path / "out2" / "state.json").read_text())
    assert state2["job"]["shared_embeddings"] == "minilm"  # taken from the supernet


def test_impossible_budget_names_fastest_latency(tmp_path, teacher_dir, data_dir):
    with pytest.raises(CanaoError, match=r"fastest reachable latency is [0-9.]+ ms"):
        run(job(tmp_path, teacher_dir, data_dir, 0.001), progress=False)


def test_dev_slices_larger_than_the_report_are_refused(tmp_path, teacher_dir, data_dir):
    with pytest.raises(CanaoError, match="20 dev questions to report on; the search, selection and choice slices "
                                         "need more than 112"):
        run(job(tmp_path, teacher_dir, data_dir, 400.0, over=dict(choose_dev=100)), progress=False)


def test_impossible_budget_leaves_nothing_to_resume(tmp_path, teacher_dir, data_dir):
    with pytest.raises(CanaoError):
        run(job(tmp_path, teacher_dir, data_dir, 0.001), progress=False)
    assert not (tmp_path / "out" / "state.json").exists()


def test_budget_must_be_given_once(tmp_path, teacher_dir, data_dir):
    with pytest.raises(CanaoError, match="either as --budget-ms"):
        run(job(tmp_path, teacher_dir, data_dir), progress=False)
    with pytest.raises(CanaoError, match="at least 1"):
        run(job(tmp_path, teacher_dir, data_dir, speedup=0.5), progress=False)
    with pytest.raises(CanaoError, match="between 80 and --seq 128"):
        run(job(tmp_path, teacher_dir, data_dir, speedup=2, seq_choices=(64, 128)), progress=False)


def test_cli_registers_search():
    from canao.cli import build_parser

    args = build_parser().parse_args(["search", "--teacher", "t", "--data", "d", "--budget-ms", "10", "--out", "o",
                                      "--preset", "full", "--resume", "--json", "--threads", "1"])
    assert args.budget_ms == 10 and args.preset == "full" and args.resume and args.json and args.threads == 1
    args = build_parser().parse_args(["search", "--teacher", "t", "--data", "d", "--speedup", "3", "--out", "o",
                                      "--device", "ssh://me@box"])
    assert args.speedup == 3 and args.budget_ms is None and args.device == "ssh://me@box"
    with pytest.raises(SystemExit):  # one budget, not both
        build_parser().parse_args(["search", "--teacher", "t", "--data", "d", "--speedup", "3", "--budget-ms", "9",
                                   "--out", "o"])


def test_cli_phase2_minutes_reaches_the_job_and_a_bad_value_is_refused(capsys, monkeypatch):
    from canao.cli import main
    from canao.compress import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda job, **kw: seen.setdefault("job", job) and {})
    base = ["search", "--teacher", "t", "--data", "d", "--speedup", "8", "--out", "o", "--json"]
    main(base + ["--phase2-minutes", "5"])
    assert seen["job"].overrides == {"phase2_seconds": 300.0}
    assert main(base + ["--phase2-minutes", "0"]) == 2
    assert "--phase2-minutes must be > 0" in capsys.readouterr().err


SEARCH = """
import sys
from pathlib import Path
from canao.compress.pipeline import Job, run
from canao.compress.teacher_cache import WindowSettings
tmp, teacher, data = map(Path, sys.argv[1:4])
over = dict(search_dev=6, select_dev=6, eval_dev=20, calibration=4, proposals=3, phase2_steps=40, phase2_seconds=None,
            eval_every=0, batch_size=4, runs=3, rounds=2, hidden_fracs=(1.0,), baselines=False, external=())
sup = dict(train_limit=16, copies=1, window=WindowSettings(128, 32), importance_batches=1, batch_size=4)
job = Job(teacher=teacher, data=data, out=tmp / "out", budget_ms=400.0, threads=1, seq=128, backend="torch",
          latency_db=tmp / "db.json", overrides=over, supernet_overrides=sup)
run(job, resume=True, progress=False)
"""


def test_a_killed_search_resumes_without_redoing_finished_stages(tmp_path, teacher_dir, data_dir):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SEARCH, str(tmp_path), str(teacher_dir), str(data_dir)]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "out"
    deadline = time.time() + 600
    state = lambda: json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}  # noqa: E731
    def checkpoints():  # a finished checkpoint: its folder renamed from .tmp
        return [p for p in out.glob("phase2-*/progress.json") if not p.parent.name.endswith(".tmp")]

    while proc.poll() is None and time.time() < deadline and not checkpoints():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # in phase 2, after its first checkpoint
    proc.wait()
    before = state()
    assert "search" in before and "phase2" not in before
    log_lines = (out / "search-log.jsonl").read_text().splitlines()
    step = json.loads(checkpoints()[0].read_text())["step"]
    assert step > 0
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    after = state()
    assert after["phase2"]["steps"] == 40 and after["search"] == before["search"]
    assert (out / "search-log.jsonl").read_text().splitlines()[:len(log_lines)] == log_lines  # nothing re-proposed
    assert f"resuming distill at step {step}" in done.stderr  # phase 2 went on from its checkpoint
    assert after["returned"]["name"] == "canao" and (out / "artifact" / "manifest.json").exists()
