"""Where the defaults live: in a checkout of the repository, or in an installed package.

Paths the user gives (inputs, --out, --model, ...) are always the caller's: relative ones are
relative to the current folder. Only the defaults below depend on where the package is.

A checkout (`CHECKOUT` is True): the package folder's parent holds `run.sh` and `data/` (the
repository as cloned, run through `./run.sh` or `python -m pipeline`, or an editable install).
The defaults are the repository's, absolute, whatever the current folder:

    REPO_ROOT               the repository (the package folder's parent)
    DEFAULT_INPUT           REPO_ROOT/data/sample       the embedded scoring sample
    DEFAULT_OUT             REPO_ROOT/submit
    DEFAULT_GENERATE_INPUT  REPO_ROOT/data/generate     the embedded generation sample
    DEFAULT_GENERATE_OUT    REPO_ROOT/submit/generate
    cache_dir()             $PIPELINE_CACHE, else REPO_ROOT/.cache

Installed (`pip install .`: the package in site-packages, no checkout around it; `CHECKOUT` is
False). The samples ship with the repository, not the package, so there is no default input:

    REPO_ROOT               None
    DEFAULT_INPUT           None   (the CLI needs input files: see NO_DEFAULT_INPUT)
    DEFAULT_GENERATE_INPUT  None
    DEFAULT_OUT             submit              relative: ./submit of the current folder at run time
    DEFAULT_GENERATE_OUT    submit/generate
    cache_dir()             $PIPELINE_CACHE, else $XDG_CACHE_HOME/ernie-pipeline,
                            else ~/.cache/ernie-pipeline

`cache_dir()` reads the environment when called, so a variable set after import counts.
No paddle, nothing imported from the rest of the package.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_NAME = "ernie-pipeline"  # the cache folder's name under $XDG_CACHE_HOME (installed)

# What the CLI says when no input is given and there is no default one (installed package).
NO_DEFAULT_INPUT = "give input files; the embedded sample ships with the repository, not the package"


def is_checkout(package_dir: Path = PACKAGE_DIR) -> bool:
    """True where `package_dir`'s parent is the repository: it holds run.sh and data/."""
    root = package_dir.parent
    return (root / "run.sh").is_file() and (root / "data").is_dir()


CHECKOUT = is_checkout()

if CHECKOUT:
    REPO_ROOT: Path | None = PACKAGE_DIR.parent
    DEFAULT_INPUT: Path | None = REPO_ROOT / "data" / "sample"
    DEFAULT_OUT = REPO_ROOT / "submit"
    DEFAULT_GENERATE_INPUT: Path | None = REPO_ROOT / "data" / "generate"
    DEFAULT_GENERATE_OUT = REPO_ROOT / "submit" / "generate"
else:
    REPO_ROOT = None
    DEFAULT_INPUT = None
    DEFAULT_OUT = Path("submit")
    DEFAULT_GENERATE_INPUT = None
    DEFAULT_GENERATE_OUT = Path("submit") / "generate"


def cache_dir() -> Path:
    """Converted models live here (git-ignored in a checkout); `PIPELINE_CACHE` moves it."""
    if os.environ.get("PIPELINE_CACHE"):
        return Path(os.environ["PIPELINE_CACHE"])
    if REPO_ROOT is not None:
        return REPO_ROOT / ".cache"
    base = os.environ.get("XDG_CACHE_HOME")
    return Path(base if base else Path.home() / ".cache") / CACHE_NAME
