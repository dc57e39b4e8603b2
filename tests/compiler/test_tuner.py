import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from canao.compiler import compile_model, load_artifact
from canao.compiler.tuner import TuningDB
from compiler_helpers import random_inputs, small_model

TOL = 1e-4


def _check(model, out):
    cm = load_artifact(out, threads=2)
    for seq in (5, 40):
        ids, tt, mask = random_inputs(seq, pad=3)
        with torch.no_grad():
            want = model(ids, tt, mask)
        got = cm.run(ids, tt, mask)
        assert max((torch.as_tensor(a) - b).abs().max().item() for a, b in zip(got, want)) <= TOL
    cm.close()


def test_second_architecture_sharing_shapes_measures_nothing(tmp_path, monkeypatch):
    from canao.compiler import tuner

    monkeypatch.setenv("CANAO_TUNING_DB", str(tmp_path / "db.json"))
    full = tuner.candidates
    monkeypatch.setattr(tuner, "candidates", lambda *a, **kw: full(*a, **kw)[::7][:3])  # a quick search
    a = small_model(hidden=32, heads=(2, 2), ffn=(48, 40), head_dim=16, seed=3)
    first = compile_model(a, tmp_path / "a", max_seq=48, tune=True)
    t = first["tuning"]
    # QKV 32->96, out 32->32, FFN 32->48, 48->32, 32->40, 40->32, QA head 32->2
    assert t["measured"] == t["signatures"] == 7 and t["reused"] == 0
    db = json.loads((tmp_path / "db.json").read_text())
    (entries,) = db["targets"].values()
    assert len(entries) == 7 and all(e["gflops"] > 0 for e in entries.values())
    # the FFN up-projections (32->48, 32->40) end in GELU: tuned as GEMM + GELU, under their own keys
    assert sorted(k for k in entries if k.endswith("|gelu")) == ["gemm|fp32|M128|N40|K32|gelu", "gemm|fp32|M128|N48|K32|gelu"]
    _check(a, tmp_path / "a")

    # another depth and layer mix, the same shapes: every schedule comes from the database
    b = small_model(hidden=32, heads=(2, 2, 2), ffn=(40, 48, 40), head_dim=16, seed=4)
    t0 = time.perf_counter()
    second = compile_model(b, tmp_path / "b", max_seq=48, tune=True)
    assert second["tuning"]["measured"] == 0 and second["tuning"]["reused"] == 7
    assert second["tuning"]["seconds"] < 1.0 and time.perf_counter() - t0 < 30
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["schedules"] and manifest["tuning"]["measured"] == 0
    _check(b, tmp_path / "b")


_WRITER = textwrap.dedent("""
    import sys
    from canao.compiler.targets import TARGETS
    from canao.compiler.tuner import TuningDB
    db = TuningDB(sys.argv[1])
    big = "x" * 200000  # a large file: the kill lands mid-write most of the time
    i = 0
    while True:
        db.put_many(TARGETS["avx2"], {f"gemm|fp32|M{i}": {"schedule": {"mr": 6, "nr": 16, "kc": 384},
                                                          "gflops": 1.0, "pad": big}})
        i += 1
        if i == 3:
            print("ready", flush=True)
""")


def test_database_survives_a_crash_mid_write(tmp_path):
    path = tmp_path / "db.json"
    for delay in (0.1, 0.3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(path.read_text())  # always a complete file
        (entries,) = data["targets"].values()
        assert len(entries) >= 3 and all(e["schedule"]["mr"] == 6 for e in entries.values())
    assert TuningDB(path).data["targets"]


def test_torn_database_is_kept_aside_not_fatal(tmp_path, capsys):
    path = tmp_path / "db.json"
    path.write_text('{"format": 1, "targets": {"avx2|x": {"gemm')
    assert TuningDB(path).data == {"format": 1, "targets": {}}
    assert "tuning database" in capsys.readouterr().err
    (aside,) = tmp_path.glob("db.json.corrupt-*")  # its data stays recoverable
    assert aside.read_text().endswith('{"gemm')
