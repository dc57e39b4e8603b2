"""ONNX Runtime fp32 decode baseline: our PyTorch Llama exported with an explicit KV cache.

One graph serves prefill and decode: inputs are input_ids [1, T] and, per layer, the past
keys and values [1, kv_heads, P, head_dim] (P may be 0); outputs are the last position's
logits [1, vocab] and the present keys/values [1, kv_heads, P + T, head_dim]. T and P are
dynamic. The graph is the model's own modules (norms, projections, MLP) around an attention
written out with MatMul/Softmax and a position-derived causal mask, so the legacy
TorchScript exporter turns it into plain ONNX ops; rotary cos/sin are gathered from the
model's own tables, so the ONNX logits match PyTorch's to float rounding.

    path = exported(model)                      # cached under $CANAO_CACHE/onnx by weight digest
    engine = OrtDecoder(path, threads=1)        # reset() / feed(ids) -> logits (baselines.protocol)
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CanaoError
from ..models.llama import Llama

OPSET = 17


class DecodeStep(nn.Module):
    """Llama forward with the KV cache as explicit inputs/outputs (what ONNX Runtime needs)."""

    def __init__(self, model: Llama):
        super().__init__()
        if not isinstance(model, Llama):
            raise CanaoError(f"the ONNX decode baseline exports canao Llama models, not {type(model).__name__}")
        self.model = model
        cfg = model.config
        self.n_layers, self.n_heads, self.n_kv, self.head_dim = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        m = self.model
        b, t = input_ids.shape
        p = past[0].shape[2]
        pos = torch.arange(t, dtype=torch.long) + p  # absolute positions of the new tokens
        cos = m.rope.cos.index_select(0, pos)  # [T, D], the model's own tables
        sin = m.rope.sin.index_select(0, pos)
        # query i (at p + i) sees keys 0 .. p + i
        keep = torch.arange(p + t, dtype=torch.long)[None, :] <= pos[:, None]
        bias = torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, float("-inf"))
        group = self.n_heads // self.n_kv
        half = self.head_dim // 2
        scale = self.head_dim ** -0.5

        def rope(x):
            return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

        x = m.embed_tokens(input_ids)
        present = []
        for i, block in enumerate(m.layers):
            a = block.self_attn
            h = block.input_layernorm(x)
            q = a.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = rope(q), rope(k)
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            present += [k, v]
            # grouped-query attention without repeating K/V: the G query heads of one KV head
            # are stacked along the query axis, [B, Hkv, G*T, D] @ [B, Hkv, D, S]
            qg = q.reshape(b, self.n_kv, group * t, self.head_dim)
            scores = (qg @ k.transpose(2, 3)) * scale
            scores = scores.view(b, self.n_kv, group, t, p + t) + bias
            probs = torch.softmax(scores, dim=-1).view(b, self.n_kv, group * t, p + t)
            y = (probs @ v).view(b, self.n_heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
            x = x + a.o_proj(y)
            x = x + block.mlp(block.post_attention_layernorm(x))
        logits = m.lm_head(m.norm(x[:, -1]))  # [B, vocab]: generation needs the last position only
        return (logits, *present)

    def io_names(self) -> tuple[list[str], list[str]]:
        past = [f"past_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]
        present = [f"present_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]
        return ["input_ids", *past], ["logits", *present]

    def empty_past(self) -> list[torch.Tensor]:
        return [torch.zeros(1, self.n_kv, 0, self.head_dim) for _ in range(2 * self.n_layers)]


def export_decoder(model: Llama, path: str | Path) -> Path:
    """Write `model` as an fp32 ONNX decode graph (seq and past length dynamic)."""
    step = DecodeStep(model)  # checks the model type before anything is written
    model.float().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ins, outs = step.io_names()
    dyn = {"input_ids": {1: "seq"}}
    dyn.update({n: {2: "past"} for n in ins[1:]})
    dyn.update({n: {2: "total"} for n in outs[1:]})
    # trace with a non-empty past so the tracer keeps the general (P > 0) path
    cfg = model.config
    past = [torch.zeros(1, cfg.num_kv_heads, 3, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    ids = torch.zeros((1, 2), dtype=torch.long)
    tmp = path.with_name(path.name + ".tmp")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated, still shipped
        torch.onnx.export(step, (ids, *past), str(tmp), input_names=ins, output_names=outs, dynamic_axes=dyn,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    tmp.replace(path)
    return path


def weights_digest(model: Llama) -> str:
    h = hashlib.sha256()
    state = model.state_dict()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().contiguous().numpy().tobytes())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:20]


def exported(model: Llama, log=None) -> Path:
    """The ONNX decode graph of `model`, exported once and cached by the weights' digest."""
    from ..paths import cache_dir

    out = cache_dir() / "onnx" / f"decoder-{weights_digest(model)}-opset{OPSET}.onnx"
    if not out.exists():
        if log:
            log(f"onnx: exporting the decode graph to {out}")
        export_decoder(model, out)
    return out


class OrtDecoder:
    """ONNX Runtime session over an exported decode graph, with the KV cache held as numpy arrays.

    Each step passes the whole past in and gets past + 1 back (the usual ORT decoder loop
    without IO binding); that copy is part of what this baseline costs.
    """

    def __init__(self, path: str | Path, threads: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CanaoError("onnxruntime is not installed: pip install 'canao[bench]'") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no spinning after a run: engines take turns, an idle pool must not steal the next one's cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.version = f"onnxruntime {ort.__version__} fp32"
        ins = self.sess.get_inputs()
        self.past_names = [i.name for i in ins[1:]]
        shape = ins[1].shape  # [1, kv_heads, "past", head_dim]
        self.empty = np.zeros((1, int(shape[1]), 0, int(shape[3])), np.float32)
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.reset()

    def reset(self) -> None:
        self.past = [self.empty] * len(self.past_names)

    def feed(self, ids) -> np.ndarray:
        feeds = {"input_ids": np.asarray(ids, dtype=np.int64).reshape(1, -1)}
        feeds.update(zip(self.past_names, self.past))
        out = self.sess.run(self.out_names, feeds)
        self.past = out[1:]
        return out[0][0]


__all__ = ["DecodeStep", "export_decoder", "exported", "OrtDecoder"]
