#!/usr/bin/env bash
# One command from a fresh clone to a serving swapd: fetch and verify the models, build the
# release binary, serve on 127.0.0.1:50051. Extra arguments go to `swapd serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
exec cargo run --release --bin swapd -- serve "$@"
