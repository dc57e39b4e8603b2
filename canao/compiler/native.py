"""The one ctypes binding base of canao's compiled artifacts (encoders: canao.h, decoders: canao_lm.h).

Both C APIs have the same shape: `<prefix>_open(weights, threads, err, err_len)` -> handle or NULL,
calls that return 0 or -1 with a one-line reason in err, `<prefix>_set_threads` and
`<prefix>_close`. NativeArtifact opens the build that runs on this CPU, declares the signatures,
resolves the thread count (the caller's, else the artifact's own setting, else all cores) and
turns C errors into CanaoError.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..errors import CanaoError
from .artifact import WEIGHTS, load_library, open_build

ERR_LEN = 512


class NativeArtifact:
    PREFIX = ""          # "canao" or "canao_lm"
    SIGNATURES: dict = {}  # C function -> (restype, [argtypes]) beyond open / set_threads / close

    def __init__(self, folder, threads: int | None = None, check: bool = True):
        self.path, self.manifest = open_build(Path(folder), check=check)  # x86-64 artifacts: this CPU's build
        self._check_manifest()
        lib = self._lib = load_library(self.path)
        self._check_library(lib)
        p = self.PREFIX
        declared = {f"{p}_open": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
                    f"{p}_set_threads": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
                    f"{p}_close": (None, [ctypes.c_void_p]), **self.SIGNATURES}
        for name, (restype, argtypes) in declared.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        if threads is not None and threads < 1:
            raise CanaoError(f"threads must be at least 1, got {threads}")
        self.threads = threads or int(self.manifest.get("threads") or os.cpu_count() or 1)
        err = ctypes.create_string_buffer(ERR_LEN)
        self._handle = getattr(lib, f"{p}_open")(str(self.path / WEIGHTS).encode(), self.threads, err, ERR_LEN)
        if not self._handle:
            raise CanaoError(f"{self.path}: {err.value.decode()}")

    def _check_manifest(self) -> None:
        """Raise when the manifest is of another kind of artifact."""

    def _check_library(self, lib) -> None:
        """Raise when the library lacks what this binding calls (an artifact of an older canao)."""

    def _call(self, name: str, *args) -> None:
        """lib.name(handle, *args, err, ERR_LEN), its -1 raised as CanaoError with the C reason."""
        err = ctypes.create_string_buffer(ERR_LEN)
        if getattr(self._lib, name)(self._handle, *args, err, ERR_LEN) != 0:
            raise CanaoError(err.value.decode())

    def set_threads(self, threads: int) -> None:
        if threads < 1:
            raise CanaoError(f"threads must be at least 1, got {threads}")
        if getattr(self._lib, f"{self.PREFIX}_set_threads")(self._handle, threads) != 0:
            raise CanaoError(f"could not start {threads} threads (out of memory?)")
        self.threads = threads

    def close(self) -> None:
        if getattr(self, "_handle", None):
            getattr(self._lib, f"{self.PREFIX}_close")(self._handle)
            self._handle = None

    def __del__(self):
        self.close()
