# What run.sh and run-buckets.sh both begin with; sourced by them (set -u on)
# with their arguments. Sets here (this directory), repo, csv (the CSV to
# send: $1, else sample.csv), pubrun (the binary, built when missing) and
# data (a fresh directory, removed on exit with the server stopped: lib.sh's
# temp_data_dir).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
. "$repo/scripts/lib.sh"
csv="$(abs_file "${1:-$here/sample.csv}")"
pubrun="$(pubrun_bin "$repo")"
temp_data_dir pubrun-seed004
