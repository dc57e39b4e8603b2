"""Compiled causal language models (Llama family): prefill and decode-step kernels with
weight-only quantized GEMVs and a static KV cache. See compile.py for the pipeline."""

from .compile import DECODER_PRECISIONS, compile_decoder
from .decoder_runtime import CompiledDecoder, is_decoder_artifact

__all__ = ["DECODER_PRECISIONS", "compile_decoder", "CompiledDecoder", "is_decoder_artifact"]
