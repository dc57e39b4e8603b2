"""One engine interface for the encoder apps: a PyTorch checkpoint now, a compiled
artifact through the same `run` signature once the compiler provides one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CanaoError
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


def load_qa_engine(spec: str) -> TorchQAEngine:
    path = resolve_model_path(spec)
    if path.is_file():
        raise CanaoError(f"{path}: a QA model is a checkpoint folder (config.json + model.safetensors)")
    return TorchQAEngine(path)
