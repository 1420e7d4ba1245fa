#!/bin/sh
# Entrypoint of the router service: follow the PACS's new stable studies and store each knee
# radiograph's synthesized maps back into its study (mris pacs watch; docs/PACS.md).
# Every option comes from the environment (MRIS_PACS_*); extra arguments pass through.
set -eu
exec mris pacs watch "$@"
