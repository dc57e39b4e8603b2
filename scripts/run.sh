#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job: a CANAO search (quick preset, aimed at 15 minutes
# on 2 cores) for the most accurate student of the reference QA teacher that runs at least
# 4x faster than the teacher when both are compiled by canao (p95, sequence 384, 1 thread),
# then SQuAD EM/F1 of the shipped 4x student on a dev slice, one question answered by the
# searched model with stage timings, and a SmolLM2-135M chat answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CANAO_DATA=${CANAO_DATA:-$(cd .. && pwd)/shared/data}
teacher=${CANAO_TEACHER:-$(cd .. && pwd)/shared/models/minilm-l6-h384-squad}
canao=.venv/bin/canao
# --resume: a finished search is reported again, an interrupted one continues
$canao search --teacher "$teacher" --task squad --data "$CANAO_DATA" --speedup 4 --preset quick \
    --out runs/search-quick --resume
$canao eval --model minilm-squad-4x --task squad --limit 400
$canao qa --model runs/search-quick/artifact \
    --context "The Analytical Engine was designed by Charles Babbage. Ada Lovelace published the first algorithm for it in 1843." \
    --question "Who published the first algorithm for the Analytical Engine?"
$canao generate --model smollm2 --prompt "Explain in two sentences why small models matter on phones." --max-new-tokens 80 --stream
