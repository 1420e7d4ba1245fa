#!/bin/sh
# Entrypoint of the api image: serve the model and the published index bundle.
# Every option comes from the environment (MRIS_*; see the README); extra arguments pass through.
set -eu
exec mris serve "$@"
