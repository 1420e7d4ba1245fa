#!/bin/sh
# Entrypoint of the one-shot init service. If a model bundle and a published index are already in
# MRIS_DATA (mounted, or made by an earlier run), it does nothing; otherwise it makes the demo
# cohort, trains the quick model and builds + publishes the index (each stage is reused when done).
set -eu
: "${MRIS_DATA:=/data}"
: "${MRIS_DEMO_SUBJECTS:=300}"
: "${MRIS_DEMO_SEED:=7}"
if [ -f "$MRIS_DATA/model/card.json" ] && [ -e "$MRIS_DATA/index/current" ]; then
    echo "init: model and index already present in $MRIS_DATA; nothing to do"
    exit 0
fi
exec mris demo --workdir "$MRIS_DATA" --subjects "$MRIS_DEMO_SUBJECTS" --seed "$MRIS_DEMO_SEED" --prepare-only "$@"
