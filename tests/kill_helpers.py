"""Crash injection for the resume tests: run a Python script in its own process and SIGKILL it."""

import os
import signal
import subprocess
import sys
import time


def run_killed(script: str, args: list[str], kill_after: float | None, timeout: float = 300) -> tuple[bool, float]:
    """Run `script` (python -c) with `args`; it prints "ready" when the work to interrupt begins. With
    kill_after, SIGKILL it that many seconds later. Returns (ran to the end, seconds after "ready")."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=timeout) == 0, time.perf_counter() - t0
