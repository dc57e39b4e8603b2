#!/usr/bin/env bash
# Fine-tune the QA teacher on a GPU machine (the recipe of `canao finetune`: 4 epochs,
# AdamW lr 1e-4, batch 32, bf16 autocast) and evaluate it on the full dev file.
# Expects .gpu/minilm (all-MiniLM-L6-v2 as float16 safetensors) and .gpu/data/squad/*.json
# in the repo; writes the figures to $OUT. The weights stay on that machine: the
# word-embedding table alone is larger than a file the device tool returns.
# It calls the Python API rather than the CLI: the GPU image lacks the web app's packages.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
rm -rf /tmp/teacher
python3 - "$out" "${LIMIT:-0}" "${EVAL_LIMIT:-0}" <<'PY'
import json, sys, torch
from canao.train.finetune import FinetuneConfig, finetune_squad
from canao.apps.command import _squad_eval
out, limit, eval_limit = sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3]) or None
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
ft = finetune_squad(".gpu/minilm", ".gpu/data/squad/train-subset-v1.1.json", "/tmp/teacher",
                    FinetuneConfig(limit=limit, max_len=384, stride=128), progress=False)
print(json.dumps(ft), flush=True)
torch.set_num_threads(16)
ev = _squad_eval("/tmp/teacher", ".gpu/data/squad/dev-v1.1.json", eval_limit, 384, 128, 64)
print(json.dumps(ev), flush=True)
json.dump({"finetune": ft, "eval": ev}, open(f"{out}/finetune_eval.json", "w"), indent=1)
PY
