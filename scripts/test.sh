#!/usr/bin/env bash
# The test command: fetch (and verify) the real models, then run every test.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
cargo test "$@"
