"""Other engines in venvs of their own, driven over JSON lines: the one helper every such baseline uses.

TFLite (litert-torch pulls jax), ExecuTorch (about 520 MB of dependencies) and llama.cpp (a
native build of llama-cpp-python) cannot share canao's environment. Each lives in a venv under
$CANAO_CACHE/venvs/<name>, created once with pinned versions (`ManagedVenv`), and runs as a worker
process that answers one JSON object per line (`JsonLinesWorker` on canao's side,
`serve_json_lines` inside the venv). Weights cross over as safetensors + JSON
(`export_qa_weights` / `load_exported_qa_model`): nothing is pickled.

This module is imported inside the venvs too: standard library only at module level.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_MARKER = ".canao-ready"


def offline() -> bool:
    """CANAO_OFFLINE=1: no network, so no venv may be created (a clear error instead of a pip failure)."""
    return os.environ.get("CANAO_OFFLINE", "") not in ("", "0")


class ManagedVenv:
    """A venv with pinned packages, created on first use and marked ready only once pip succeeded.

    name: folder under $CANAO_CACHE/venvs and the prefix of every message. see_main_packages: the
    main environment's site-packages (torch, numpy, safetensors) are visible behind the venv's own.
    build_env / build_stamp: environment and settings of a native build (part of the ready marker,
    so changing them rebuilds). needs_tools: executables the install needs (named in the error).
    install_hint: what a user does when the venv cannot be created here."""

    def __init__(self, name: str, pins: tuple[str, ...], *, see_main_packages: bool = True,
                 build_env: dict | None = None, build_stamp: str = "", needs_tools: tuple[str, ...] = (),
                 install_hint: str = "", size_note: str = ""):
        self.name, self.pins = name, tuple(pins)
        self.see_main_packages, self.build_env, self.build_stamp = see_main_packages, build_env or {}, build_stamp
        self.needs_tools, self.install_hint, self.size_note = needs_tools, install_hint, size_note

    @property
    def folder(self) -> Path:
        from ..paths import cache_dir

        return cache_dir() / "venvs" / self.name

    @property
    def python(self) -> Path:
        return self.folder / "bin" / "python"

    def stamp(self) -> str:
        return " ".join(self.pins) + (f" | {self.build_stamp}" if self.build_stamp else "")

    def ready(self) -> bool:
        marker = self.folder / READY_MARKER
        return marker.exists() and marker.read_text() == self.stamp()

    def _fail(self, what: str, detail: str = ""):
        from ..errors import CanaoError

        hint = f" ({self.install_hint})" if self.install_hint else ""
        return CanaoError(f"{self.name}: {what}{hint}" + (f": {detail}" if detail else ""))

    def ensure(self, log=None) -> Path:
        """The venv's python, creating the venv when it is missing or was made with other pins."""
        if self.ready():
            return self.python
        v = self.folder
        if offline():
            raise self._fail(f"its venv {v} is missing and CANAO_OFFLINE is set",
                             f"it needs {' '.join(self.pins)}{self.size_note}")
        missing = [tool for tool in self.needs_tools if shutil.which(tool) is None]
        if missing:
            raise self._fail(f"creating its venv needs {' and '.join(missing)} (apt-get install cmake g++)")
        say = log or (lambda m: print(m, file=sys.stderr, flush=True))
        say(f"{self.name}: creating {v} with {' '.join(self.pins)} (once{self.size_note})")
        t0 = time.perf_counter()
        if v.exists():
            shutil.rmtree(v)  # a half-made venv (no ready marker) starts over
        proc = subprocess.run([sys.executable, "-m", "venv", str(v)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise self._fail(f"could not create the venv {v}", proc.stderr.strip()[-300:])
        if self.see_main_packages:
            vsite = subprocess.run([str(self.python), "-c", "import site; print(site.getsitepackages()[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
            # after the venv's own packages: the venv's pins win where both have a package
            (Path(vsite) / "zz_canao_main.pth").write_text(site.getsitepackages()[0] + "\n")
        pip_log = v / "pip.log"
        with open(pip_log, "w") as fh:
            proc = subprocess.run([str(self.python), "-m", "pip", "install", "--no-cache-dir", *self.pins],
                                  stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **self.build_env})
        if proc.returncode != 0:
            raise self._fail(f"could not install {' '.join(self.pins)} (log {pip_log})",
                             "..." + pip_log.read_text()[-500:].strip())
        (v / READY_MARKER).write_text(self.stamp())
        (v / ".canao-build-seconds").write_text(f"{time.perf_counter() - t0:.0f}")
        say(f"{self.name}: venv ready in {time.perf_counter() - t0:.0f} s")
        return self.python


class JsonLinesWorker:
    """A worker process `python -m MODULE serve` in a managed venv; ask() sends one JSON request and
    returns its reply, raising CanaoError for an {"error"} reply or a worker that exited.
    stderr: None discards the worker's stderr; a path appends it there (named in the exit error)."""

    def __init__(self, venv: ManagedVenv, module: str, *, log=None, stderr: Path | None = None,
                 env: dict | None = None):
        py = venv.ensure(log)
        self.name, self.stderr_path = venv.name, stderr
        self._stderr = open(stderr, "a") if stderr else subprocess.DEVNULL
        self.proc = subprocess.Popen([str(py), "-m", module, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})

    def ask(self, msg: dict) -> dict:
        from ..errors import CanaoError

        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            where = f" (see {self.stderr_path})" if self.stderr_path else ""
            raise CanaoError(f"{self.name} worker exited{where}")
        reply = json.loads(line)
        if "error" in reply:
            raise CanaoError(f"{self.name} worker: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EncoderWorker(JsonLinesWorker):
    """A worker that runs converted QA encoders by key: run() -> the forward pass's milliseconds, timed
    inside the worker (without the pipe); logits() -> (start, end) float32 [1, n], n the input's length
    (a static-shape model runs padded inside; the positions past the input are cut off)."""

    def run(self, key: str, ids, tt, mask) -> float:
        return self.ask({"cmd": "run", "key": key, "ids": ids.tolist(), "tt": tt.tolist(), "mask": mask.tolist()})["ms"]

    def logits(self, key: str, ids, tt, mask):
        import numpy as np

        r = self.ask({"cmd": "run", "key": key, "ids": ids.tolist(), "tt": tt.tolist(), "mask": mask.tolist(),
                      "logits": True})
        return np.asarray(r["start"], np.float32), np.asarray(r["end"], np.float32)


def serve_json_lines(handle, out=None) -> None:
    """Inside the venv: answer each JSON line on stdin with handle(msg) (a dict), or {"error": ...} when it
    raises, and keep serving."""
    out = out or sys.stdout
    for line in sys.stdin:
        try:
            reply = handle(json.loads(line))
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def export_qa_weights(model, folder: Path) -> Path:
    """A QA encoder's weights (safetensors) and config (JSON) in folder/<digest>/, named by content,
    for a worker to rebuild with load_exported_qa_model."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = json.dumps(vars(model.config), sort_keys=True, default=str)
    digest = hashlib.sha256(config.encode())
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].numpy().tobytes())
    out = folder / digest.hexdigest()[:20]
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"))
        (out / "config.json").write_text(config)  # written last: marks the folder complete
    return out


def load_exported_qa_model(folder: str | Path):
    """Inside a worker: the model export_qa_weights wrote, in eval mode."""
    from safetensors.torch import load_file

    from ..models.bert import BertConfig, BertForQuestionAnswering

    config = json.loads((Path(folder) / "config.json").read_text())
    model = BertForQuestionAnswering(BertConfig(**config)).eval()
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model


def convert_in_venv(venv: ManagedVenv, module: str, weights: Path, args: list[str], out: Path, what: str,
                    log=None, env: dict | None = None) -> Path:
    """Runs `python -m MODULE convert WEIGHTS ARGS... OUT` in the venv; out must exist afterwards."""
    from ..errors import CanaoError

    py = venv.ensure(log)
    if log:
        log(f"{venv.name}: {what} -> {out.name} (a minute or two)")
    t0 = time.perf_counter()
    proc = subprocess.run([str(py), "-m", module, "convert", str(weights), *args, str(out)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})
    if proc.returncode != 0 or not out.exists():
        raise CanaoError(f"{venv.name}: conversion failed: {proc.stderr.strip()[-800:]}")
    if log:
        log(f"{venv.name}: converted in {time.perf_counter() - t0:.0f} s")
    return out
