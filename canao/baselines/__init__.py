"""Decode baselines that canao's compiled text generation is measured against.

Each engine here runs outside canao's own code path (llama.cpp through llama-cpp-python
in its own venv, ONNX Runtime on an exported fp32 graph) and answers the same
questions: per-token decode milliseconds at a given context, time to first token,
and the greedy token ids for a fixed prompt.
"""
