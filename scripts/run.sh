#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job on the built-in models: SQuAD EM/F1 of
# the reference QA teacher on a dev slice, one answered question with stage timings,
# and a SmolLM2-135M chat answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CANAO_DATA=${CANAO_DATA:-$(cd .. && pwd)/shared/data}
teacher=${CANAO_TEACHER:-$(cd .. && pwd)/shared/models/minilm-l6-h384-squad}
canao=.venv/bin/canao
$canao eval --model "$teacher" --task squad --limit 400
$canao qa --model "$teacher" \
    --context "The Analytical Engine was designed by Charles Babbage. Ada Lovelace published the first algorithm for it in 1843." \
    --question "Who published the first algorithm for the Analytical Engine?"
$canao generate --model smollm2 --prompt "Explain in two sentences why small models matter on phones." --max-new-tokens 80 --stream
