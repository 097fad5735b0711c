#!/usr/bin/env bash
# The soak: one command, a fresh machine is fine:
#   scripts/soak.sh                       # 8 clients, 30 minutes, a reload every 3 s
#   DURATION=60 scripts/soak.sh           # the short run CI does
# Serves SmolLM2 as two real versions (the shipped GGUF and a perturbed copy, as
# bench-reload.sh does) and runs, side by side for DURATION s:
#   - `swapd bench reload`: CLIENTS well-behaved streaming clients, a reload alternating the
#     two versions every RELOAD_EVERY s; every stream must succeed and name one version;
#   - `swapd bench chaos`: CHAOS clients that cancel mid-stream, read slowly past their
#     deadline, and send bad requests; each must get its expected outcome.
# It reads the server's RSS and open file descriptors from /proc before and after (the
# "after" once every client has stopped and the last drain is over), and fails unless: 0
# failed requests, 0 mixed streams, every reload committed, 0 unexpected chaos outcomes,
# open fds within FD_MARGIN (8) and RSS within RSS_MARGIN_PCT (25%) of the start.
# Environment: DURATION (1800), CLIENTS (8), CHAOS (2), RELOAD_EVERY (3), MAX_TOKENS (64),
# OUT (target/soak), PORT (50161), METRICS_PORT (9574), BIN (build the release binary; CI
# passes target/debug/swapd, which its test build already made).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-1800}
CLIENTS=${CLIENTS:-8}
CHAOS=${CHAOS:-2}
RELOAD_EVERY=${RELOAD_EVERY:-3}
MAX_TOKENS=${MAX_TOKENS:-64}
OUT=${OUT:-target/soak}
PORT=${PORT:-50161}
METRICS_PORT=${METRICS_PORT:-9574}
FD_MARGIN=${FD_MARGIN:-8}
RSS_MARGIN_PCT=${RSS_MARGIN_PCT:-25}
TOKEN=soak-token

source scripts/bench-lib.sh
models_and_binary
scratch

two_versions "$work/models" smollm2-135m-instruct
start_server "$OUT/server.log" "$PORT" "$METRICS_PORT" --models-root "$work/models" \
    --state-dir "$work/state" --max-concurrent $((CLIENTS + CHAOS)) --max-queue 64

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$server/status"; }
fds() { find "/proc/$server/fd" -mindepth 1 -maxdepth 1 | wc -l; }
# Warm up (the first requests allocate caches that stay), then the baseline.
"$bin" generate --server "$server_url" --max-tokens 8 "Hello" >/dev/null
rss_start=$(rss_kb)
fds_start=$(fds)
started=$(date +%s)

"$bin" bench reload --server "$server_url" --token "$TOKEN" \
    --metrics "http://127.0.0.1:$METRICS_PORT/metrics" --clients "$CLIENTS" \
    --max-tokens "$MAX_TOKENS" --label soak --out "$OUT/soak" --duration "$DURATION" \
    --reload-every "$RELOAD_EVERY" \
    --version "smollm2/a.gguf=$sha_a" --version "smollm2/b.gguf=$sha_b" >"$OUT/bench.log" 2>&1 &
bench_pid=$!
status=0
"$bin" bench chaos --server "$server_url" --duration "$DURATION" --clients "$CHAOS" \
    --out "$OUT/chaos.json" >"$OUT/chaos.log" 2>&1 || status=1
wait "$bench_pid" || status=1
# Every client has stopped; give the last reload's drain and free a moment.
sleep 5
rss_end=$(rss_kb)
fds_end=$(fds)
elapsed=$(($(date +%s) - started))

python3 - "$OUT" "$rss_start" "$rss_end" "$fds_start" "$fds_end" "$FD_MARGIN" "$RSS_MARGIN_PCT" \
    "$elapsed" "$CLIENTS" "$CHAOS" "$RELOAD_EVERY" <<'PY' || status=1
import json, sys
out, rss0, rss1, fd0, fd1, fdm, rssm, elapsed, clients, chaos, every = sys.argv[1:]
rss0, rss1, fd0, fd1, fdm, rssm = map(int, (rss0, rss1, fd0, fd1, fdm, rssm))
r = json.load(open(f"{out}/soak.json"))
c = json.load(open(f"{out}/chaos.json"))
reloads = r["reload_details"]
failed_reloads = [x for x in reloads if not x["committed"]]
checks = [
    ("failed requests", r["failed_requests"], r["failed_requests"] == 0),
    ("mixed-version streams", r["mixed_version_streams"], r["mixed_version_streams"] == 0),
    ("reloads committed", f'{r["reloads_committed"]} of {r["reloads"]}', not failed_reloads and reloads),
    ("unexpected chaos outcomes", sum(c["unexpected"].values()), not c["unexpected"]),
    ("open fds start -> end", f"{fd0} -> {fd1} (margin +{fdm})", fd1 <= fd0 + fdm),
    ("RSS start -> end (MB)", f"{rss0/1024:.1f} -> {rss1/1024:.1f} (margin +{rssm}%)", rss1 <= rss0 * (100 + rssm) / 100),
]
lines = [
    f"## Soak: {clients} clients + {chaos} chaos clients, a reload every {every} s, {elapsed} s",
    "",
    f"{r['requests']} streams; chaos: {c['cancels']} cancels, {c['slow_readers']} slow readers, {c['bad_requests']} bad requests",
    "",
    "| check | value | ok |",
    "|---|---|---|",
]
lines += [f"| {n} | {v} | {'yes' if ok else '**NO**'} |" for n, v, ok in checks]
if c["unexpected"]:
    lines += ["", "Unexpected chaos outcomes:"] + [f"- {k}: {v}" for k, v in c["unexpected"].items()]
if failed_reloads:
    lines += ["", "Failed reloads:"] + [f"- {x['source']} at {x['start']:.1f} s: {x['error']}" for x in failed_reloads]
lines += ["", "Every reload (source, committed, seconds):", ""]
lines += [f"- {x['source']}: {'committed' if x['committed'] else 'FAILED'} in {x['end'] - x['start']:.2f} s" for x in reloads]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:6 + len(checks)]))
sys.exit(0 if all(ok for _, _, ok in checks) else 1)
PY
echo "soak: $OUT/summary.md (bench: $OUT/soak.md, chaos: $OUT/chaos.json)"
exit $status
