#!/usr/bin/env bash
# The install works as written: build the sdist and the wheel (the wheel from the sdist, so a file missing
# from the sdist fails here), check py.typed ships, install the wheel into a fresh virtual environment
# (pinned torch first), and run the sinusoid smoke example from outside the source tree against the
# installed package. Usage: bash scripts/check_wheel.sh [PYTHON]   (PYTHON: has `build`; default python)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/metalearn-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
echo "built $(basename "$sdist") and $(basename "$wheel")"

"$python" - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
assert "metalearn/py.typed" in names, "py.typed is missing from the wheel (tool.setuptools.package-data)"
for sub in ("knowledge", "models", "modes", "tasks", "train"):
    assert f"metalearn/{sub}/__init__.py" in names, f"metalearn.{sub} is missing from the wheel"
assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names), "the wheel ships non-package files"
members = tarfile.open(sdist).getnames()
assert any(m.endswith("/LICENSE") for m in members) and any(m.endswith("/README.md") for m in members)
print(f"wheel: {len(names)} files, py.typed included; sdist: {len(members)} entries")
PY

"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0   # pinned first: never an unpinned (CUDA) torch
"$work/venv/bin/python" -m pip install -q "$wheel"

mkdir "$work/outside" && cp examples/sinusoid.py "$work/outside/"
cd "$work/outside"
env -u PYTHONPATH OMP_NUM_THREADS=1 MPLBACKEND=Agg "$work/venv/bin/python" - <<'PY'
import pathlib, metalearn
where = pathlib.Path(metalearn.__file__).resolve()
assert "site-packages" in where.parts, f"imported metalearn from {where}, not from the installed wheel"
assert (where.parent / "py.typed").exists()
print(f"import metalearn {metalearn.__version__} from {where.parent}")
PY
env -u PYTHONPATH OMP_NUM_THREADS=1 MPLBACKEND=Agg "$work/venv/bin/python" sinusoid.py --smoke --no-progress --out out
test -s out/results.json
echo "wheel check passed"
