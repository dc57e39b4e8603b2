"""torch.export of an encoder, translated into canao's IR.

The frontend only translates: each ATen operator becomes IR operators tagged
with their mapping type (scaled_dot_product_attention is written out as its
matmul / scale / mask / softmax / matmul steps so the fusion passes see plain
mapping types). Anything not in the table below stops compilation with the
operator's name and the model code it came from.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch

from ..errors import CanaoError
from .ir import SEQ, VIEW_KINDS, Graph, Mapping, Op, Tensor, broadcast_mapping

INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")


def export_model(model: torch.nn.Module, max_seq: int) -> torch.export.ExportedProgram:
    """torch.export with the sequence length dynamic up to max_seq (batch 1)."""
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    example = torch.randint(1, 100, (1, min(16, max_seq)))
    args = (example, torch.zeros_like(example), torch.ones_like(example))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(model.eval(), args, dynamic_shapes=({1: seq}, {1: seq}, {1: seq}))
        except Exception as exc:  # torch raises many types; the user needs the first line
            raise CanaoError(f"torch.export failed on this model: {str(exc).splitlines()[0]}") from None


def source_of(node: torch.fx.Node) -> str:
    """'module.path (file.py:line)' for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else "<top>"
    where = ""
    frames = [f for f in re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
              if "/torch/" not in f[0]]  # the model's own line, not torch.nn internals
    if frames:
        path, line = frames[-1]
        where = f" ({path.split('/canao/')[-1] if '/canao/' in path else path}:{line})"
    return f"{module or '<top>'}{where}"


def _dim(d) -> int | str:
    if isinstance(d, int):
        return d
    if re.fullmatch(r"s\d+", str(d)):
        return SEQ
    raise CanaoError(f"frontend: dimension expression '{d}' is not supported (only the sequence length may vary)")


class _Builder:
    def __init__(self, ep: torch.export.ExportedProgram):
        self.ep = ep
        self.g = Graph({}, [], [], [], {})
        self.origin: dict[str, tuple[str, bool]] = {}  # const -> (state_dict key, transposed), for the cache
        self.values: dict[str, object] = {}  # fx node name -> IR tensor name (or list, or python scalar)
        self.src = ""

    # -- helpers ---------------------------------------------------------
    def shape(self, node) -> tuple:
        return tuple(_dim(d) for d in node.meta["val"].shape)

    def emit(self, kind, mapping, inputs, shape, attrs=None) -> str:
        # views keep their input's dtype; computed tensors are float32
        dtype = self.g.tensors[inputs[0]].dtype if mapping in VIEW_KINDS else "float32"
        out = self.g.new_tensor(kind, shape, dtype)
        self.g.ops.append(Op(kind, mapping, list(inputs), out, attrs or {}, self.src))
        return out

    def ew(self, expr, inputs, shape) -> str:
        mapping = broadcast_mapping([self.g.tensors[i] for i in inputs], Tensor("", tuple(shape)))
        return self.emit("ew", mapping, inputs, shape, {"expr": expr})

    def binary(self, fn, a, b, shape) -> str:
        """An elementwise binary op where either side may be a Python scalar."""
        if isinstance(a, str) and isinstance(b, str):
            return self.ew((fn, ("in", 0), ("in", 1)), [a, b], shape)
        if isinstance(a, str):
            return self.ew((fn, ("in", 0), ("const", float(b))), [a], shape)
        return self.ew((fn, ("const", float(a)), ("in", 0)), [b], shape)

    def val(self, arg):
        if isinstance(arg, torch.fx.Node):
            return self.values[arg.name]
        return arg

    # -- translation -----------------------------------------------------
    def build(self) -> Graph:
        sig = self.ep.graph_signature
        params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        for node in self.ep.graph.nodes:
            self.src = source_of(node)
            if node.op == "placeholder":
                if node.name in params:
                    value = self.ep.state_dict[params[node.name]].detach().float().numpy()
                    name = self.g.add_const(node.name, value)
                    self.origin[name] = (params[node.name], False)
                else:
                    name = node.name
                    self.g.tensors[name] = Tensor(name, self.shape(node), "int64")
                    self.g.inputs.append(name)
                self.values[node.name] = name
            elif node.op == "call_function":
                self.values[node.name] = self.call(node)
            elif node.op == "output":
                self.g.outputs = [self.values[a.name] for a in node.args[0]]
        if self.g.inputs != list(INPUT_NAMES):
            raise CanaoError(f"frontend: the model's inputs are {self.g.inputs}, expected {list(INPUT_NAMES)}")
        return self.g.prune()

    def call(self, node):
        target = node.target
        name = getattr(target, "__name__", str(target))
        args = [self.val(a) for a in node.args]
        kwargs = {k: self.val(v) for k, v in node.kwargs.items()}
        aten = torch.ops.aten
        if target in (aten.sym_size.int, aten._assert_tensor_metadata.default):
            return None
        if target is aten.dropout.default:
            if args[2]:
                raise CanaoError(f"frontend: dropout in training mode at {self.src}; export the model in eval mode")
            return args[0]
        if target is aten.to.dtype or target is aten._to_copy.default:
            src_dtype = self.g.tensors[args[0]].dtype
            if src_dtype == "float32":
                return args[0]
            return self.emit("ew", Mapping.ELEMENTWISE, [args[0]], self.shape(node), {"expr": ("to_float", ("in", 0))})
        shape = self.shape(node) if hasattr(node.meta.get("val"), "shape") else None
        binaries = {aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul", aten.div.Tensor: "div",
                    aten.mul.Scalar: "mul", aten.add.Scalar: "add", aten.div.Scalar: "div", aten.sub.Scalar: "sub"}
        if target in binaries:
            if len(args) > 2 and args[2] != 1 or kwargs.get("alpha", 1) != 1:
                raise CanaoError(f"frontend: {name} with alpha != 1 at {self.src} is not supported")
            return self.binary(binaries[target], args[0], args[1], shape)
        if target is aten.rsub.Scalar:
            return self.binary("sub", args[1], args[0], shape)
        if target is aten.gelu.default:
            if kwargs.get("approximate", args[1] if len(args) > 1 else "none") != "none":
                raise CanaoError(f"frontend: tanh-approximated gelu at {self.src} is not supported")
            return self.ew(("gelu", ("in", 0)), [args[0]], shape)
        if target is aten.linear.default:
            return self.linear(args[0], args[1], args[2] if len(args) > 2 else None, shape)
        if target is aten.layer_norm.default:
            eps = args[4] if len(args) > 4 else 1e-5
            if len(args[1]) != 1 or args[2] is None or args[3] is None:
                raise CanaoError(f"frontend: layer_norm over several dims or without affine at {self.src}")
            return self.emit("layernorm", Mapping.REDUCTION, [args[0], args[2], args[3]], shape, {"eps": float(eps)})
        if target in (aten.softmax.int, aten._softmax.default):
            if args[1] not in (-1, len(shape) - 1):
                raise CanaoError(f"frontend: softmax over a dim other than the last at {self.src}")
            return self.emit("softmax", Mapping.REDUCTION, [args[0]], shape)
        if target is aten.embedding.default:
            return self.embedding(node, args[0], args[1], shape)
        if target is aten.arange.default or target is aten.arange.start:
            return ("arange", node)
        if target in (aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim,
                      aten._unsafe_view.default):
            return self.emit("view", Mapping.RESHAPE, [args[0]], shape)
        if target is aten.transpose.int:
            perm = list(range(len(shape)))
            a, b = (d % len(shape) for d in args[1:3])
            perm[a], perm[b] = perm[b], perm[a]
            return self.emit("permute", Mapping.TRANSPOSE, [args[0]], shape, {"perm": perm})
        if target is aten.permute.default:
            return self.emit("permute", Mapping.TRANSPOSE, [args[0]], shape, {"perm": [d % len(shape) for d in args[1]]})
        if target is aten.unbind.int:
            dim = args[1] % len(self.g.tensors[args[0]].shape)
            outs = node.meta["val"]
            return [self.emit("select", Mapping.RESHAPE, [args[0]], tuple(_dim(d) for d in o.shape),
                              {"dim": dim, "index": i}) for i, o in enumerate(outs)]
        if target is aten.select.int:
            dim = args[1] % len(self.g.tensors[args[0]].shape)
            return self.emit("select", Mapping.RESHAPE, [args[0]], shape, {"dim": dim, "index": args[2]})
        if name == "getitem":
            return args[0][args[1]]
        if target in (aten.matmul.default, aten.bmm.default):
            return self.emit("matmul", Mapping.MATMUL, args[:2], shape)
        if target is aten.scaled_dot_product_attention.default:
            return self.attention(args, kwargs, shape)
        raise CanaoError(f"frontend: operator {name} is not supported (at {self.src})")

    def linear(self, x, weight, bias, shape):
        if not self.g.is_const(weight):
            raise CanaoError(f"frontend: linear with a computed weight at {self.src}")
        w = self.g.add_const(weight + "_t", self.g.consts[weight].T)  # [K, N]: the layout matmul reads
        if weight in self.origin:
            self.origin[w] = (self.origin[weight][0], True)
        y = self.emit("matmul", Mapping.MATMUL, [x, w], shape)
        return self.ew(("add", ("in", 0), ("in", 1)), [y, bias], shape) if bias is not None else y

    def embedding(self, node, table, index, shape):
        if isinstance(index, tuple) and index[0] == "arange":  # positions 0..S-1: rows in order
            arange = index[1]
            if arange.args[0] is not None and len(arange.args) > 1 and arange.args[0] != 0:
                raise CanaoError(f"frontend: arange not starting at 0 at {self.src}")
            return self.emit("gather", Mapping.GATHER, [table], shape, {"index": "iota"})
        return self.emit("gather", Mapping.GATHER, [table, index], shape, {"index": "tensor"})

    def attention(self, args, kwargs, shape):
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if (args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)) or kwargs.get("is_causal") or \
                (len(args) > 5 and args[5]):
            raise CanaoError(f"frontend: attention with dropout or a causal mask at {self.src} is not supported")
        qs = self.g.tensors[q].shape
        scale = kwargs.get("scale") or (args[6] if len(args) > 6 and args[6] else 1.0 / math.sqrt(qs[-1]))
        ks = self.g.tensors[k].shape
        kt = self.emit("permute", Mapping.TRANSPOSE, [k], (*ks[:-2], ks[-1], ks[-2]),
                       {"perm": [*range(len(ks) - 2), len(ks) - 1, len(ks) - 2]})
        score_shape = (*qs[:-1], ks[-2])
        s = self.emit("matmul", Mapping.MATMUL, [q, kt], score_shape)
        s = self.binary("mul", s, scale, score_shape)
        if mask is not None:
            if self.g.tensors[mask].dtype != "float32":
                raise CanaoError(f"frontend: boolean attention masks at {self.src} are not supported")
            s = self.binary("add", s, mask, score_shape)
        p = self.emit("softmax", Mapping.REDUCTION, [s], score_shape)
        return self.emit("matmul", Mapping.MATMUL, [p, v], shape)


def capture(model: torch.nn.Module, max_seq: int, cache: bool = True) -> Graph:
    """The model as canao IR, sequence length dynamic up to max_seq.

    torch.export (importing its tracer, then tracing) is most of a compile's time, and the
    IR depends only on the architecture: the model's code, its configuration, its parameter
    names and shapes, max_seq and the torch version. So the traced IR is kept, as JSON with
    each constant named by the parameter it came from ($CANAO_CACHE/frontend/), and a model of
    an architecture seen before gets its IR from there, filled with its own weights."""
    key = _cache_key(model, max_seq) if cache else None
    path = _cache_path(key) if key else None
    if path is not None and path.exists():
        g = _load_cached(path, model)
        if g is not None:
            return g
    builder = _Builder(export_model(model, max_seq))
    g = builder.build()
    state_keys = set(model.state_dict())
    if path is not None and all(c in builder.origin and builder.origin[c][0] in state_keys for c in g.consts):
        _store_cached(path, g, builder.origin)
    return g


FRONTEND_CACHE_VERSION = 1


def _cache_key(model: torch.nn.Module, max_seq: int) -> str | None:
    import hashlib
    import inspect
    from pathlib import Path

    h = hashlib.sha256(f"v{FRONTEND_CACHE_VERSION}|{torch.__version__}|{max_seq}|{type(model).__qualname__}|"
                       f"{getattr(model, 'config', None)!r}".encode())
    try:
        for f in sorted({inspect.getsourcefile(type(model)), __file__, str(Path(__file__).with_name("ir.py"))}):
            h.update(Path(f).read_bytes())
    except (TypeError, OSError):  # a model whose code cannot be read: no cache
        return None
    for name, t in model.state_dict().items():
        h.update(f"|{name}:{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()[:32]


def _cache_path(key: str):
    from ..paths import cache_dir

    return cache_dir() / "frontend" / f"{key}.json"


def _enc(x):
    """JSON with tuples kept apart from lists (IR expressions are tuples, codegen compares them)."""
    if isinstance(x, tuple):
        return {"t": [_enc(v) for v in x]}
    if isinstance(x, list):
        return [_enc(v) for v in x]
    if isinstance(x, dict):
        return {"d": {k: _enc(v) for k, v in x.items()}}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot cache {type(x).__name__}")


def _dec(x):
    if isinstance(x, list):
        return [_dec(v) for v in x]
    if isinstance(x, dict):
        return tuple(_dec(v) for v in x["t"]) if "t" in x else {k: _dec(v) for k, v in x["d"].items()}
    return x


def _store_cached(path, g: Graph, origin: dict) -> None:
    import json

    from ..fileio import atomic_write_text

    try:
        doc = {"tensors": [[t.name, _enc(t.shape), t.dtype] for t in g.tensors.values()],
               "ops": [[op.kind, op.mapping.value, op.inputs, op.output, _enc(op.attrs), op.source] for op in g.ops],
               "inputs": g.inputs, "outputs": g.outputs,
               "consts": {name: list(origin[name]) for name in g.consts}}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc))
    except (TypeError, OSError):  # attrs of a kind the cache does not know, a read-only cache: just trace
        pass


def _load_cached(path, model: torch.nn.Module) -> Graph | None:
    import json

    try:
        doc = json.loads(path.read_text())
        state = model.state_dict()
        g = Graph({}, [], list(doc["inputs"]), list(doc["outputs"]), {})
        for name, shape, dtype in doc["tensors"]:
            g.tensors[name] = Tensor(name, _dec(shape), dtype)
        g.ops = [Op(kind, Mapping(m), list(ins), out, _dec(attrs), src) for kind, m, ins, out, attrs, src in doc["ops"]]
        for name, (key, transposed) in doc["consts"].items():
            value = state[key].detach().float().numpy()
            g.consts[name] = np.ascontiguousarray(value.T if transposed else value, dtype=np.float32)
            if g.consts[name].shape != g.tensors[name].shape:
                return None
        return g
    except (OSError, ValueError, KeyError, TypeError):  # a damaged or foreign entry: trace again
        return None
