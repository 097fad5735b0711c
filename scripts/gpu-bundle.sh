#!/usr/bin/env bash
# Makes the device bundle: what travels to a lent GPU machine, where there is no network, no
# Rust toolchain and no model file, 10 minutes per command and about 15 of device time in all.
#
#   target/gpu-bundle/swapd.xz     the `--features cuda` release binary (profile cuda-bundle:
#                                  optimised, stripped), built with the CUDA 13.0 toolkit for
#                                  CUDA_COMPUTE_CAP (default 90: H100/H200), xz-compressed
#   target/gpu-bundle/bundle.json  the toolkit's CUDA version, the compute capability, the
#                                  commit, the binary's sha256 and sizes
#
# scripts/gpu-device.sh (tracked, so it travels with the tree) runs it there:
#   device run, carry ["target/gpu-bundle"], command "scripts/gpu-device.sh"
# The bundle must fit in the tree that travels (64 MiB with everything else): over
# MAX_MIB (default 50) compressed, this script fails.
#
# Variables: CUDA_COMPUTE_CAP, CUDA_CHECK_DIR, CUDA_HOME as for scripts/check-cuda-build.sh;
# BUNDLE (default target/gpu-bundle); MAX_MIB; BUNDLE_PROFILE (default cuda-bundle). CI uses
# BUNDLE_PROFILE=cuda-check: the unoptimised compile-and-link build it makes anyway, which
# is larger than the optimised one (so it bounds the size from above) but not worth running
# on a GPU; a cold cuda-bundle build takes about 21 minutes on 2 cores, too long for CI.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-target/gpu-bundle}
MAX_MIB=${MAX_MIB:-50}
BUNDLE_PROFILE=${BUNDLE_PROFILE:-cuda-bundle}
start=$SECONDS

bin="$(CUDA_CHECK_PROFILE=$BUNDLE_PROFILE scripts/check-cuda-build.sh | tee /dev/stderr | tail -1)"
[[ -x "$bin" ]] || {
    echo "no binary came out of the cuda build" >&2
    exit 1
}
# shellcheck source=/dev/null
source "$(CUDA_CHECK_ENV_ONLY=1 scripts/check-cuda-build.sh | tail -1)"
toolkit="$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"

mkdir -p "$BUNDLE"
rm -f "$BUNDLE/swapd.xz" "$BUNDLE/bundle.json"
# Stripped here too: the cuda-check profile keeps symbols.
strip -o "$BUNDLE/swapd.stripped" "$bin"
if command -v xz >/dev/null; then
    xz -T0 -9 -c "$BUNDLE/swapd.stripped" >"$BUNDLE/swapd.xz.tmp"
else
    python3 -c "import lzma,shutil,sys; shutil.copyfileobj(open(sys.argv[1],'rb'), lzma.open(sys.argv[2],'wb',preset=9))" \
        "$BUNDLE/swapd.stripped" "$BUNDLE/swapd.xz.tmp"
fi
mv "$BUNDLE/swapd.xz.tmp" "$BUNDLE/swapd.xz"
raw=$(stat -c %s "$BUNDLE/swapd.stripped")
packed=$(stat -c %s "$BUNDLE/swapd.xz")
needed="$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ' | xargs)"
cat >"$BUNDLE/bundle.json" <<JSON
{
  "toolkit_cuda": "$toolkit",
  "compute_cap": "${CUDA_COMPUTE_CAP}",
  "commit": "$(git rev-parse HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo "-dirty")",
  "built": "$(date -u +%Y-%m-%dT%H:%MZ)",
  "profile": "$BUNDLE_PROFILE",
  "binary_sha256": "$(sha256sum "$BUNDLE/swapd.stripped" | cut -d' ' -f1)",
  "binary_bytes": $raw,
  "xz_bytes": $packed,
  "needed": "$needed"
}
JSON
rm -f "$BUNDLE/swapd.stripped"
cat "$BUNDLE/bundle.json"
mib=$((packed / 1048576))
if ((packed > MAX_MIB * 1048576)); then
    echo "the bundle is ${mib} MiB compressed, over MAX_MIB=${MAX_MIB}: it would not travel" >&2
    exit 1
fi
echo "== bundle ($BUNDLE_PROFILE): $BUNDLE/swapd.xz, $((raw / 1048576)) MiB -> ${mib} MiB (limit ${MAX_MIB}), CUDA $toolkit, sm_${CUDA_COMPUTE_CAP}, in $((SECONDS - start)) s"
