#!/bin/sh
# The "worker application" of seed 001, standing in for a real importer
# image: reads its parameters from the environment (templated from the
# trigger message by pubrun) and the message itself from $PUBRUN_DATA_FILE,
# pretends to convert and index documents, and exits with a code that says
# how it went (pubrun publishes it to `results`).
set -eu
echo "importer: full=${FULL:-?} index=${INDEX:-?} run=${PUBRUN_RUN_ID:-?} attempt=${PUBRUN_ATTEMPT:-?}"
echo "importer: trigger message: $(cat "${PUBRUN_DATA_FILE:-/dev/null}")"
echo "importer: on $(hostname), $(nproc 2>/dev/null || echo '?') CPUs"
docs=0
for batch in 1 2 3 4 5; do
  sleep 1
  docs=$((docs + 1000))
  echo "importer: batch $batch indexed, $docs documents"
done
if [ "${FAIL:-}" = 1 ]; then
  echo "importer: failing on purpose" >&2
  exit 3
fi
echo "importer: done, $docs documents in index ${INDEX:-?}"
