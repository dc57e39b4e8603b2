"""Hugging Face checkpoint folders: config.json + safetensors (single or sharded).

Never unpickles: .bin/.pt/.pth/.ckpt files are refused with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CanaoError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CanaoError(
            f"{path}: pickled checkpoints are refused (they can run arbitrary code); "
            "convert it to safetensors first (safetensors.torch.save_file)"
        )


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise CanaoError(f"{folder}: no config.json; a checkpoint folder needs config.json and model.safetensors")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CanaoError(f"{path}: not valid JSON ({exc}); restore the file from the original checkpoint") from None
    if not isinstance(config, dict):
        raise CanaoError(f"{path}: expected a JSON object")
    return config


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CanaoError(f"{path}: corrupt or unreadable safetensors file ({exc}); re-download or re-save it") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one, or the shards its index lists)."""
    folder = Path(folder)
    if (folder / SINGLE).exists():
        return [folder / SINGLE]
    if (folder / INDEX).exists():
        try:
            shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise CanaoError(f"{folder / INDEX}: malformed shard index ({exc})") from None
        return [folder / s for s in shards]
    raise CanaoError(f"{folder}: no {SINGLE} or {INDEX} found")


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, as float32 where they were floating point."""
    folder = Path(folder)
    if folder.is_file():
        refuse_pickle(folder)
        raise CanaoError(f"{folder}: expected a checkpoint folder (config.json + model.safetensors)")
    if (folder / SINGLE).exists():
        tensors = _load_one(folder / SINGLE)
    elif (folder / INDEX).exists():
        try:
            index = json.loads((folder / INDEX).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise CanaoError(f"{folder / INDEX}: malformed shard index ({exc})") from None
        tensors = {}
        for shard in shards:
            if not (folder / shard).exists():
                raise CanaoError(f"{folder}: shard {shard} listed in {INDEX} is missing")
            tensors.update(_load_one(folder / shard))
    else:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(folder / pickles[0])
        raise CanaoError(f"{folder}: no {SINGLE} or {INDEX} found")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}


def save_checkpoint(folder: Path, config: dict, state: dict[str, torch.Tensor], extra_files: dict[str, Path] | None = None,
                    dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> None:
    """Write a Hugging Face layout folder (config.json + model.safetensors [+ tokenizer files]).

    `dtype` stores floating-point tensors in that type (float16 halves the size);
    `max_shard_bytes` splits the weights into model-0000N-of-0000M.safetensors files
    with an index, as Hugging Face does for large models.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors refuses shared storage (tied weights): store contiguous copies.
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().clone() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    for name, src in (extra_files or {}).items():
        if Path(src).resolve() != (folder / name).resolve():
            (folder / name).write_bytes(Path(src).read_bytes())
