#!/usr/bin/env bash
# The whole benchmark, one command on a fresh machine (~45 min on 2 cores, plus ~10 min the
# first time to build llama.cpp):
#   scripts/bench.sh
# 1. scripts/bench-peers.sh: swapd served vs the bare loop vs candle vs llama.cpp, the memory
#    floor, and 1/2/4/8 concurrent streams;
# 2. scripts/bench-reload.sh: reload under load (steady, reloads, resource-preserving).
# Writes target/bench/report.md (both summaries), with JSON and SVG plots beside it. Each
# script's environment variables pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
OUT=target/bench/peers scripts/bench-peers.sh || status=1
OUT=target/bench scripts/bench-reload.sh || status=1
cat target/bench/peers/peers.md target/bench/summary.md >target/bench/report.md 2>/dev/null || true
echo "report: target/bench/report.md"
exit $status
