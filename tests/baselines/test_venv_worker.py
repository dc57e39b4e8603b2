"""The helper every venv baseline (TFLite, ExecuTorch, llama.cpp) runs through: the managed venv's ready
marker and offline refusal, and the JSON-lines worker's replies, errors and exit."""

import sys
from pathlib import Path

import pytest

from canao.baselines.venv_worker import REPO_ROOT, JsonLinesWorker, ManagedVenv
from canao.errors import CanaoError

# a worker module like the real ones: serve_json_lines around a handler
ECHO_WORKER = '''
import sys
from canao.baselines.venv_worker import serve_json_lines

def handle(msg):
    if msg["cmd"] == "echo":
        return {"echo": msg["value"]}
    if msg["cmd"] == "boom":
        raise ValueError("boom " + str(msg["value"]))
    sys.stderr.write("leaving on request\\n")
    sys.exit(3)

if __name__ == "__main__" and sys.argv[1] == "serve":
    serve_json_lines(handle)
'''


def _ready_venv(tmp_path, monkeypatch, pins=("echo==1.0",)) -> ManagedVenv:
    """A managed venv marked ready whose python is this interpreter: no pip, no network."""
    monkeypatch.setenv("CANAO_CACHE", str(tmp_path / "cache"))
    venv = ManagedVenv("echo", pins)
    (venv.folder / "bin").mkdir(parents=True)
    (venv.folder / "bin" / "python").symlink_to(sys.executable)
    (venv.folder / ".canao-ready").write_text(venv.stamp())
    return venv


def test_worker_replies_reports_errors_and_names_its_exit(tmp_path, monkeypatch):
    venv = _ready_venv(tmp_path, monkeypatch)
    (tmp_path / "echo_worker.py").write_text(ECHO_WORKER)
    log = tmp_path / "worker.log"
    with JsonLinesWorker(venv, "echo_worker", stderr=log,
                         env={"PYTHONPATH": f"{tmp_path}:{REPO_ROOT}"}) as worker:
        assert worker.ask({"cmd": "echo", "value": [1, 2.5, "x"]}) == {"echo": [1, 2.5, "x"]}
        with pytest.raises(CanaoError, match=r"^echo worker: ValueError: boom 7$"):
            worker.ask({"cmd": "boom", "value": 7})
        assert worker.ask({"cmd": "echo", "value": 2}) == {"echo": 2}  # still serving after an error
        with pytest.raises(CanaoError, match=rf"^echo worker exited \(see {log}\)$"):
            worker.ask({"cmd": "leave"})
        with pytest.raises(CanaoError, match="echo worker exited"):  # and stays a clear error
            worker.ask({"cmd": "echo", "value": 3})
    assert "leaving on request" in log.read_text()


def test_ready_marker_names_the_pins_and_the_build(tmp_path, monkeypatch):
    venv = _ready_venv(tmp_path, monkeypatch)
    assert venv.ready() and venv.ensure() == venv.python  # ready: nothing is installed
    assert not ManagedVenv("echo", ("echo==1.1",)).ready()  # other pins: rebuilt
    assert not ManagedVenv("echo", ("echo==1.0",), build_stamp="-DNATIVE=ON").ready()  # other build settings


def test_offline_without_the_venv_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CANAO_CACHE", str(tmp_path))
    monkeypatch.setenv("CANAO_OFFLINE", "1")
    venv = ManagedVenv("echo", ("echo==1.0",), install_hint="run it once online")
    with pytest.raises(CanaoError) as err:
        venv.ensure()
    msg = str(err.value)
    assert msg.startswith(f"echo: its venv {tmp_path / 'venvs' / 'echo'} is missing and CANAO_OFFLINE is set")
    assert "run it once online" in msg and "echo==1.0" in msg and "\n" not in msg
    assert not Path(tmp_path / "venvs" / "echo").exists()


def test_missing_build_tools_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CANAO_CACHE", str(tmp_path))
    venv = ManagedVenv("native", ("x==1",), needs_tools=("no-such-compiler-canao",))
    with pytest.raises(CanaoError, match="native: creating its venv needs no-such-compiler-canao"):
        venv.ensure()
    assert not (tmp_path / "venvs" / "native").exists()
