"""canao's compiler: PyTorch encoder -> fused, generated native code in an artifact folder.

Public API:
    compile_model(model, out, precision="fp32", max_seq=384, target="host") -> summary dict
    load_artifact(path, threads=None) -> CompiledModel with .run(input_ids, token_type_ids,
        attention_mask) -> (start_logits, end_logits) and .manifest
"""

from .driver import compile_model
from .encoder_runtime import CompiledModel


def load_artifact(path, threads: int | None = None) -> CompiledModel:
    return CompiledModel(path, threads)


__all__ = ["compile_model", "load_artifact", "CompiledModel"]
