#!/usr/bin/env bash
# Compile-and-link check of `--features cuda` on a machine with no GPU and no CUDA toolkit.
#
# nvcc, the CUDA headers and the CUDA libraries come from NVIDIA's PyPI wheels (the CUDA 13.0
# set, pinned below) installed in a scratch virtualenv; they are assembled into a CUDA_HOME
# layout under the scratch directory. The one library the wheels do not ship is libcuda (it
# belongs to the driver): a stub exporting the driver API's symbols, generated from the
# wheel's own cuda.h, is put on the link path only. It is never on any run-time library
# path, so the binary built here needs a real driver to start (see README, "CUDA").
#
# Variables (all optional):
#   CUDA_COMPUTE_CAP   compute capability the kernels are built for (default 90: H100/H200)
#   CUDA_CHECK_DIR     scratch directory: venv, CUDA_HOME layout, stub, cargo target
#                      (default target/cuda-check, inside the repository's ignored target/)
#   CUDA_HOME          use this CUDA toolkit instead of installing the wheels (it must have
#                      bin/nvcc, include/ and the libraries in lib64/ or lib/)
#   CUDA_CHECK_PROFILE cargo profile for the build (default cuda-check: no optimisation, no
#                      debug info; use release to build the binary you will run)
#   PYTHON             interpreter for the scratch virtualenv (default python3)
#   CUDA_CHECK_ENV_ONLY set (to anything): only set up the toolkit and write
#                      CUDA_CHECK_DIR/env.sh (CUDA_HOME, CUDA_COMPUTE_CAP, PATH and
#                      SWAPD_CUDA_LIBS, the run-time library path), print its path, build nothing
# With -- ARGS, ARGS replace the default cargo command's target selection (`--bin swapd`),
# e.g. `scripts/check-cuda-build.sh -- --all-targets` builds the tests too.
#
# Prints the path of the built binary on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."

# The CUDA 13.0 wheel set (the versions the cuda-toolkit==13.0.3.0 metapackage pins). Not a
# newer one: candle's kernels are PTX that the driver compiles when a kernel first loads, and
# a driver cannot compile PTX from a toolkit newer than itself (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
# The lent GPU machines run driver 580 (CUDA 13.0); scripts/gpu-device.sh checks this first.
WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35
    nvidia-cublas==13.1.1.3
)

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
dir="${CUDA_CHECK_DIR:-target/cuda-check}"
profile="${CUDA_CHECK_PROFILE:-cuda-check}"
python="${PYTHON:-python3}"
targets=(--bin swapd)
if [[ "${1:-}" == "--" ]]; then
    shift
    targets=("$@")
fi
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
start=$SECONDS

if [[ -z "${CUDA_HOME:-}" ]]; then
    venv="$dir/venv"
    stamp="$venv/.wheels"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${WHEELS[*]}" ]]; then
        echo "== installing the CUDA wheels into $venv"
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check "${WHEELS[@]}"
        echo "${WHEELS[*]}" >"$stamp"
    fi
    cu="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
    # The wheels ship versioned sonames only (libcublas.so.13); the linker wants libX.so.
    export CUDA_HOME="$dir/cuda-home"
    rm -rf "$CUDA_HOME"
    mkdir -p "$CUDA_HOME/lib64"
    for d in bin include nvvm; do ln -s "$cu/$d" "$CUDA_HOME/$d"; done
    for so in "$cu"/lib/*; do
        base="$(basename "$so")"
        ln -s "$so" "$CUDA_HOME/lib64/$base"
        [[ "$base" == *.so.* ]] && ln -sf "$so" "$CUDA_HOME/lib64/${base%%.so.*}.so"
    done
else
    echo "== using the CUDA toolkit at CUDA_HOME=$CUDA_HOME"
fi
export PATH="$CUDA_HOME/bin:$PATH"

# libcuda is the driver's: a link-time stub with every driver API function of this cuda.h
# (after the header's own renames such as cuMemAlloc -> cuMemAlloc_v2). It lives in
# lib64/stubs, which cudarc's build script puts on the link path and nothing puts on a
# run-time path; its soname is the driver's, libcuda.so.1. Every function fails with
# CUDA_ERROR_NO_DEVICE, which the run-time check below uses as "a driver, but no GPU".
have_libcuda=""
for f in "$CUDA_HOME"/lib64/libcuda.so "$CUDA_HOME"/lib/libcuda.so \
    "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/lib/stubs/libcuda.so; do
    [[ -e "$f" ]] && have_libcuda="$f" # any one of them (ls on all four failed when one was missing)
done
if [[ -z "$have_libcuda" ]]; then
    if [[ "$CUDA_HOME" != "$dir/cuda-home" ]]; then
        echo "CUDA_HOME=$CUDA_HOME has no libcuda.so (not even in lib64/stubs); install the toolkit's driver stubs" >&2
        exit 1
    fi
    mkdir -p "$CUDA_HOME/lib64/stubs"
    stub="$CUDA_HOME/lib64/stubs/libcuda.c"
    echo '#include <cuda.h>' | gcc -E -P -I"$CUDA_HOME/include" - |
        grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
        sed 's/.*/int &(void) { return 100; }/' >"$stub" # CUDA_ERROR_NO_DEVICE
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib64/stubs/libcuda.so" "$stub"
    echo "== libcuda link stub: $(wc -l <"$stub") driver API symbols"
fi

# For scripts/gpu-check.sh and for building by hand: the toolkit environment, and the run-time
# library path (the wheels' libraries, never the stubs).
cat >"$dir/env.sh" <<ENV
export CUDA_HOME='$CUDA_HOME'
export CUDA_COMPUTE_CAP='$CUDA_COMPUTE_CAP'
export PATH="\$CUDA_HOME/bin:\$PATH"
export SWAPD_CUDA_LIBS="\$CUDA_HOME/lib64:\$CUDA_HOME/lib"
ENV
if [[ -n "${CUDA_CHECK_ENV_ONLY:-}" ]]; then
    echo "$dir/env.sh"
    exit 0
fi

# The check only needs the kernels to compile: ptxas without optimisation saves about a
# quarter of their build time. A release build (gpu-check.sh) optimises as usual.
if [[ "$profile" == cuda-check ]]; then
    export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:--Xptxas -O0}"
fi
echo "== nvcc: $(nvcc --version | tail -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; profile $profile; NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:-}"
export CARGO_TARGET_DIR="$dir/cargo"
cargo build --locked --profile "$profile" --features cuda "${targets[@]}"

case "$profile" in dev) out=debug ;; *) out="$profile" ;; esac
bin="$CARGO_TARGET_DIR/$out/swapd"
if [[ -x "$bin" ]]; then
    # The link proves the symbols resolve; the dynamic section shows what it needs at run time.
    needed="$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
    echo "== linked; needs at run time: $needed"
    case "$needed" in *libcuda.so.1*) ;; *)
        echo "the cuda binary does not link libcuda.so.1: the feature did not take effect" >&2
        exit 1
        ;;
    esac
    # Run time without a GPU: a driver that reports no device (the stub, or the toolkit's own
    # stub libcuda, loaded as libcuda.so.1 for this check only). `auto` must fall back to
    # the CPU with its log line, `cuda` must fail clearly. The model file is missing on
    # purpose: the device opens before any model loads, and nothing needs serving here.
    stub_lib=""
    for f in "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/lib/stubs/libcuda.so; do
        [[ -f "$f" ]] && stub_lib="$f" && break
    done
    if [[ -n "$stub_lib" ]]; then
        fake="$dir/no-device-driver"
        mkdir -p "$fake/models"
        ln -sf "$stub_lib" "$fake/libcuda.so.1"
        printf '[[model]]\nname = "m"\nkind = "llm"\nsource = "m.gguf"\n[model.sha256]\n"m.gguf" = "%064d"\n' 0 \
            >"$fake/models/models.toml"
        serve() {
            NO_COLOR=1 RUST_BACKTRACE=0 LD_LIBRARY_PATH="$fake:$CUDA_HOME/lib64:$CUDA_HOME/lib" \
                timeout 60 "$bin" serve --device "$1" --listen 127.0.0.1:0 --models-root "$fake/models" 2>&1 || true
        }
        auto="$(serve auto)"
        cuda="$(serve cuda)"
        if ! grep -q 'using the CPU.*CUDA device 0' <<<"$auto"; then
            echo "--device auto with no usable GPU did not fall back to the CPU:" >&2
            echo "$auto" >&2
            exit 1
        fi
        if ! grep -q 'cuda:0 requested, but it cannot be opened' <<<"$cuda"; then
            echo "--device cuda with no usable GPU did not fail clearly:" >&2
            echo "$cuda" >&2
            exit 1
        fi
        echo "== no usable GPU: --device auto: $(grep -o 'using the CPU.*' <<<"$auto" | head -1)"
        echo "== no usable GPU: --device cuda: $(grep -o 'startup failed: .*' <<<"$cuda" | head -1)"
    fi
fi
echo "== cuda build check passed in $((SECONDS - start)) s"
echo "$bin"
