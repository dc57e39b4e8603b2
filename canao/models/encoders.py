"""Load and save BERT-family encoders from Hugging Face checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CanaoError
from .bert import BertConfig, BertForQuestionAnswering, BertForSequenceClassification
from .checkpoint import load_state_dict, read_config, save_checkpoint
from .wordpiece import load_wordpiece, tokenizer_files

HEADS = {"qa": BertForQuestionAnswering, "classification": BertForSequenceClassification}


def _per_layer_sizes(state: dict[str, torch.Tensor], prefix: str, cfg: BertConfig, folder: Path) -> BertConfig:
    """Per-layer head counts and FFN sizes as the tensors say (a pruned checkpoint may
    carry a uniform config); a tensor that fits neither is a clear error."""
    heads, ffn = [], []
    layer = 0
    while f"{prefix}encoder.layer.{layer}.attention.self.query.weight" in state:
        q = state[f"{prefix}encoder.layer.{layer}.attention.self.query.weight"]
        inter = state.get(f"{prefix}encoder.layer.{layer}.intermediate.dense.weight")
        if q.shape[1] != cfg.hidden_size or inter is None or inter.shape[1] != cfg.hidden_size:
            raise CanaoError(
                f"{folder}: layer {layer} has input width {q.shape[1]} but config.json says hidden_size {cfg.hidden_size}; "
                "the config does not belong to these weights"
            )
        if q.shape[0] % cfg.head_dim:
            raise CanaoError(f"{folder}: layer {layer} query width {q.shape[0]} is not a multiple of head_dim {cfg.head_dim}")
        heads.append(q.shape[0] // cfg.head_dim)
        ffn.append(inter.shape[0])
        layer += 1
    if not heads:
        raise CanaoError(f"{folder}: no encoder layers found in the weights (expected keys like {prefix}encoder.layer.0.*)")
    if len(heads) != cfg.num_layers:
        raise CanaoError(f"{folder}: weights have {len(heads)} layers but config.json says {cfg.num_layers}")
    cfg.layer_heads, cfg.layer_ffn = heads, ffn
    return cfg


# config.json key of a model whose word-embedding table is another installed model's (sliced to its
# channels) instead of being stored: the table is the largest tensor of a small encoder (30522 x 384),
# and a student that kept it frozen can refer to it (see compress/distill.py).
SHARED_TABLE = "canao_word_embeddings"
WORD_TABLE = "embeddings.word_embeddings.weight"


def shared_word_table(spec: dict) -> torch.Tensor:
    """The table a SHARED_TABLE entry names: {"model": built-in name, "channels": [...], "sha256": ...}."""
    import hashlib

    from ..paths import resolve_model_path

    folder = resolve_model_path(spec["model"])
    state = load_state_dict(folder)
    table = state.get(WORD_TABLE, state.get("bert." + WORD_TABLE))
    if table is None:
        raise CanaoError(f"{folder}: has no word-embedding table to share")
    table = table.float()[:, torch.as_tensor(spec["channels"])].contiguous()
    digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]
    if spec.get("sha256") and digest != spec["sha256"]:
        raise CanaoError(f"the word-embedding table of '{spec['model']}' ({folder}) is not the one this model was "
                         f"trained with (checksum {digest}, expected {spec['sha256']}); reinstall that package's "
                         "version named in the model's README")
    return table


def load_encoder(path: str | Path, task: str = "qa", new_head_ok: bool = False):
    """(model, tokenizer) from a checkpoint folder. `new_head_ok` lets a bare encoder
    (such as the pretrained all-MiniLM-L6-v2) start with a freshly initialised task head."""
    folder = Path(path)
    if task not in HEADS:
        raise CanaoError(f"unknown encoder task '{task}'; choose one of {sorted(HEADS)}")
    raw = read_config(folder)
    arch = (raw.get("architectures") or ["BertModel"])[0]
    known = {"BertModel", "BertForQuestionAnswering", "BertForSequenceClassification", "BertForMaskedLM", "BertForPreTraining"}
    if raw.get("model_type") != "bert" or arch not in known:
        raise CanaoError(
            f"{folder}: architecture '{arch}' (model_type '{raw.get('model_type')}') is not a BERT encoder; "
            "give a BERT-family checkpoint, or a GGUF/decoder model to `canao generate`"
        )
    cfg = BertConfig.from_hf(raw)
    state = load_state_dict(folder)
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    if raw.get(SHARED_TABLE) and prefix + WORD_TABLE not in state:
        state[prefix + WORD_TABLE] = shared_word_table(raw[SHARED_TABLE])
    cfg = _per_layer_sizes(state, prefix, cfg, folder)
    model = HEADS[task](cfg)
    # Our parameter names are HF's; a bare encoder has them without the "bert." prefix.
    renamed = {("bert." + k if not prefix else k): v for k, v in state.items() if not k.endswith("position_ids")}
    expected = model.state_dict()
    head_keys = {k for k in expected if not k.startswith("bert.") or k.startswith("bert.pooler.")}
    missing = [k for k in expected if k not in renamed]
    if missing and not (new_head_ok and set(missing) <= head_keys):
        raise CanaoError(f"{folder}: weights lack {missing[0]} (and {len(missing) - 1} more) needed for task '{task}'")
    for key, tensor in renamed.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise CanaoError(f"{folder}: tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict({k: v for k, v in renamed.items() if k in expected}, strict=False)
    model.eval()
    return model, load_wordpiece(folder)


def save_encoder(model, out: str | Path, tokenizer_dir: str | Path, shared_table: dict | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Save in the Hugging Face layout (config.json, model.safetensors, tokenizer files). With
    `shared_table` ({"model", "channels"}) the word-embedding table is not stored but referred to;
    it must equal that model's table exactly."""
    import hashlib

    out = Path(out)
    config, state = model.config.to_hf(model.architecture), dict(model.state_dict())
    if shared_table is not None:
        table = shared_word_table({**shared_table, "sha256": None})
        mine = state.pop("bert." + WORD_TABLE).float().cpu()
        if mine.shape != table.shape or not torch.equal(mine, table):
            raise CanaoError(f"the model's word-embedding table is not {shared_table['model']}'s; it cannot refer to it")
        config[SHARED_TABLE] = {**shared_table, "sha256": hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]}
    save_checkpoint(out, config, state, tokenizer_files(tokenizer_dir), dtype=dtype)
    return out
