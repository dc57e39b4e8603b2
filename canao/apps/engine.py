"""One engine interface for the encoder apps: a PyTorch checkpoint now, a compiled
artifact through the same `run` signature once the compiler provides one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CanaoError
from ..models.bert import BertConfig
from ..models.encoders import load_encoder
from ..paths import resolve_model_path


class TorchQAEngine:
    """A BERT QA checkpoint run by PyTorch in fp32."""

    def __init__(self, folder: Path):
        self.model, self.tokenizer = load_encoder(folder, task="qa")
        cfg = self.model.config
        self.info = {
            "engine": "pytorch",
            "model": str(folder),
            "precision": "fp32",
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "parameters": cfg.num_parameters(),
            "size_mb": round(cfg.num_parameters() * 4 / 2**20, 1),
            "max_seq": cfg.max_position_embeddings,
        }

    @torch.inference_mode()
    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray):
        start, end = self.model(torch.as_tensor(input_ids), torch.as_tensor(token_type_ids), torch.as_tensor(attention_mask))
        return start.numpy(), end.numpy()


class ArtifactQAEngine:
    """A compiled canao artifact (folder with manifest.json), run by its native library."""

    def __init__(self, folder: Path, threads: int | None = None):
        from ..compiler import load_artifact
        from ..models.wordpiece import load_wordpiece

        self.compiled = load_artifact(folder, threads=threads)
        self.tokenizer = load_wordpiece(folder)
        m = self.compiled.manifest
        arch = m["model"]
        cfg = BertConfig(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"], layer_heads=arch["layer_heads"],
                         layer_ffn=arch["layer_ffn"], head_dim=arch["head_dim"])
        weight_bytes = m.get("memory", {}).get("weight_bytes", 0)
        self.info = {
            "engine": "canao",
            "model": str(folder),
            "precision": m["precision"],
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "parameters": cfg.num_parameters(),
            "size_mb": round(weight_bytes / 2**20, 1),
            "max_seq": m["max_seq"],
            "target": m["target"]["name"] if isinstance(m.get("target"), dict) else m.get("target"),
            "threads": self.compiled.threads,  # what the runtime's thread pool was opened with
        }

    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray):
        return self.compiled.run(input_ids, token_type_ids, attention_mask)


def load_qa_engine(spec: str, threads: int | None = None):
    """A checkpoint folder runs on PyTorch; a compiled artifact on its generated code."""
    path = resolve_model_path(spec)
    if path.is_file():
        raise CanaoError(f"{path}: a QA model is a checkpoint folder (config.json + model.safetensors) or a compiled artifact")
    if (path / "manifest.json").exists():
        return ArtifactQAEngine(path, threads)
    return TorchQAEngine(path)
