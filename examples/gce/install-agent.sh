#!/bin/sh
# Bakes `pubrun` into a Compute Engine image for a gce pool.
#
# Run once, as root, on a builder instance made from the base image you
# want (Debian 12 here), then create an image from its disk (README step 4).
# pubrun's own startup script (set by the pool on every instance it makes)
# then finds /usr/local/bin/pubrun and starts `pubrun agent`.
#
#   PUBRUN_BINARY=gs://my-artifacts/pubrun  sh install-agent.sh
#   PUBRUN_BINARY=https://example.com/pubrun sh install-agent.sh
set -eu
# As a startup script, the URL comes from the instance's metadata.
if [ -z "${PUBRUN_BINARY:-}" ]; then
  PUBRUN_BINARY="$(curl -fsS -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/PUBRUN_BINARY 2>/dev/null || true)"
fi
: "${PUBRUN_BINARY:?set PUBRUN_BINARY to a gs:// or https:// URL of a linux pubrun binary}"

case "$PUBRUN_BINARY" in
  gs://*)
    # The builder's service account needs storage.objects.get on it.
    gcloud storage cp "$PUBRUN_BINARY" /usr/local/bin/pubrun ;;
  https://*|http://*)
    curl -fsSL -o /usr/local/bin/pubrun "$PUBRUN_BINARY" ;;
  *)
    cp "$PUBRUN_BINARY" /usr/local/bin/pubrun ;;
esac
chmod 0755 /usr/local/bin/pubrun
/usr/local/bin/pubrun --version

# Docker, for jobs with `docker = {...}` (process jobs need nothing more).
if ! command -v docker >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq docker.io
fi

# The agent keeps its work under /var/lib/pubrun-agent (pubrun agent --data-dir).
mkdir -p /var/lib/pubrun-agent
echo "pubrun installed; stop this instance and create an image from its boot disk."
