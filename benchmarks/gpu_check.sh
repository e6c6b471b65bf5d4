#!/usr/bin/env bash
# The prepared accelerator check: everything that needs a GPU, in one command (< 8 minutes on one H200).
#
#   OUT=/some/dir benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--stages a,b,...] [--budget S]
#   benchmarks/gpu_check.sh OUTDIR [options]              # when $OUT is unset
#
# First, before anything else: the wheels in .whl/ (benchmarks/fetch_wheels.sh) go into a private
# site directory when the packages they hold are missing (a machine without a registry), and the project
# is installed there too. Then benchmarks/gpu_check.py runs the stages, each in its own process with a
# timeout, writes one JSON file per stage under the output folder and ends with one summary line.
# `--device cpu --quick` is the dry run that the test suite runs.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
out_arg=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then out_arg="$1"; shift; fi
out="${OUT:-$out_arg}"
if [ -z "$out" ]; then
    echo "error: set OUT or pass the output folder as the first argument" >&2
    exit 2
fi
mkdir -p "$out" || { echo "error: cannot create $out" >&2; exit 2; }
py="${PYTHON:-python3}"
site="${GPU_CHECK_SITE:-$(mktemp -d /tmp/centerpoint-site.XXXXXX)}"
log="$site/setup.log"
: >"$log"

# 1. Packages the machine lacks, from .whl/ (cp312 manylinux wheels; no registry is reached).
missing="$("$py" - <<'EOF'
import importlib.util
need = ["pydantic", "pydantic_core", "annotated_types", "typing_inspection", "pycocotools", "cv2", "typer", "rich",
        "safetensors", "yaml", "PIL", "numpy", "tensorboard"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)"
wheels="none needed"
if [ -n "$missing" ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
                .whl/*.whl >>"$log" 2>&1; then
            wheels="installed $(ls .whl/*.whl | wc -l) wheels for: $missing"
        else
            wheels="FAILED to install .whl/ for: $missing (see setup.json)"
        fi
    else
        wheels="MISSING $missing and no .whl/ folder (run benchmarks/fetch_wheels.sh where a registry is reachable)"
    fi
fi
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"

# 2. The project itself (its console script; the code on PYTHONPATH is this checkout's).
if "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . >>"$log" 2>&1; then
    project="installed into $site"
else
    project="FAILED to install (see setup.json); running from the checkout"
fi
export PATH="$site/bin:$PATH"
export GPU_CHECK_WHEELS="$wheels" GPU_CHECK_PROJECT="$project" GPU_CHECK_SETUP_LOG="$log" PYTHONUNBUFFERED=1

# 3. The stages.
"$py" "$repo/benchmarks/gpu_check.py" --out "$out" "$@"
rc=$?
if [ -z "${GPU_CHECK_SITE:-}" ]; then rm -rf "$site"; fi
exit $rc
