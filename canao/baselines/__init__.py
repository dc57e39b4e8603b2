"""Every engine canao is measured against, and `canao bench`.

encoder_engines: QA encoders on canao's artifact, PyTorch, ONNX Runtime, OpenVINO, TFLite/LiteRT and
ExecuTorch behind one interface (load, run, time); encoder_bench interleaves them.
decode_bench: canao's compiled decoder against llama.cpp (llama-cpp-python) and ONNX Runtime on
the same questions: per-token decode milliseconds at a given context, time to first token, and the
greedy token ids for a fixed prompt (protocol). Engines that cannot share canao's environment run
in managed venvs as JSON-lines workers (venv_worker).
"""
