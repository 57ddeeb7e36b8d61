"""The package installs (`pip install .`, console script `pipeline`) and runs from any folder.

Offline and quick: the package is built from a copy of its sources (nothing is written into the
checkout), without build isolation and without an index.

* A wheel needs setuptools' `bdist_wheel`: in setuptools >= 70.1, or the `wheel` package for an
  older one. The venv's setuptools 65.5 has neither (and `pip wheel` then fails with "invalid
  command 'bdist_wheel'"), so there the closest offline check is taken: the sdist is built with
  `setuptools.build_meta` (what pip builds a wheel from) and installed with setuptools'
  own `install` into a prefix: the same modules, metadata (egg-info) and console script. Where
  a wheel can be built, it is, and installed with `pip install --target`.
* The installed copy is then run from another folder, with only the install on PYTHONPATH:
  `python -m pipeline --help` and the console script, which must import the installed copy
  and have the installed defaults of pipeline.paths (no input, ./submit, the user cache).
* `run.sh` is run from another folder with relative paths (input, --out, --model), on a tiny
  model, when the repository's .venv is already installed (run.sh's stamps), so nothing is
  installed by the test.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import pipeline
from tests.sample_data import sample_rows, write_tsv

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DIST = "ernie-batch-pipeline"
ENTRY = "pipeline.cli:main"
SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "requirements.txt", "requirements-model.txt")


def _package_modules(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in (folder / "pipeline").rglob("*.py")
            if "__pycache__" not in p.parts}


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#")[0].strip() for line in lines) if s]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a child: nothing of the repository on PYTHONPATH, a home and caches of
    its own (nothing written to the real ones)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIPELINE_CACHE", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp / "home")
    env.update(extra)
    return env


def _run(cmd, cwd: Path, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _can_build_wheel() -> bool:
    from packaging.version import Version

    return (Version(importlib.metadata.version("setuptools")) >= Version("70.1")
            or importlib.util.find_spec("wheel") is not None)


def test_version_and_metadata_match_the_package():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = meta["project"]
    assert project["version"] == pipeline.__version__
    assert project["name"] == DIST
    assert project["scripts"] == {"pipeline": ENTRY}
    assert project["dynamic"] == ["dependencies"]
    assert meta["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["pipeline*"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The package built from a copy of its sources and installed into a folder of its own."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = _env(tmp)

    r = _run([PY, "-c", "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))", tmp / "sdist"],
             src, env)
    assert r.returncode == 0, r.stdout + r.stderr
    sdist = tmp / "sdist" / r.stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "sdist", filter="data")
    unpacked = tmp / "sdist" / sdist.name.removesuffix(".tar.gz")
    assert (unpacked / "requirements.txt").is_file(), "the sdist lacks the dependencies' file"

    if _can_build_wheel():
        r = _run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "--disable-pip-version-check", "-w", tmp / "wheel", unpacked], tmp, env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        (wheel,) = (tmp / "wheel").glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
            entry_points = z.read(ep).decode()
        assert {n for n in names if n.startswith("pipeline/") and n.endswith(".py")} == _package_modules(ROOT)
        assert {n.split("/")[0] for n in names if "/" in n} <= {"pipeline", ep.split("/")[0]}
        site = tmp / "site"
        r = _run([PY, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                  "--target", site, wheel], tmp, env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        script = site / "bin" / "pipeline"
        how = "wheel"
    else:
        prefix = tmp / "prefix"
        r = _run([PY, "-c", "from setuptools import setup; setup()", "install", "--single-version-externally-managed",
                  "--record", tmp / "installed.txt", "--home", prefix], unpacked, env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        site = prefix / "lib" / "python"
        script = prefix / "bin" / "pipeline"
        (info,) = site.glob("*.egg-info")
        entry_points = (info / "entry_points.txt").read_text()
        how = "sdist"
    assert f"pipeline = {ENTRY}" in [line.strip() for line in entry_points.splitlines()]
    assert script.is_file()
    return {"site": site, "script": script, "how": how, "tmp": tmp}


def test_the_install_holds_the_package_and_its_metadata(installed):
    site = installed["site"]
    assert _package_modules(site) == _package_modules(ROOT)
    assert not (site / "tests").exists() and not (site / "scripts").exists()
    (dist,) = [d for d in importlib.metadata.distributions(path=[str(site)]) if d.metadata["Name"] == DIST]
    assert dist.version == pipeline.__version__
    assert [str(ep.value) for ep in dist.entry_points.select(group="console_scripts", name="pipeline")] == [ENTRY]
    assert dist.requires == _requirements()


PROBE = """
import json, sys
import pipeline, pipeline.config as c, pipeline.paths as p
print(json.dumps({"file": pipeline.__file__, "checkout": p.CHECKOUT, "root": c.REPO_ROOT,
                  "input": c.DEFAULT_INPUT, "generate_input": c.DEFAULT_GENERATE_INPUT,
                  "out": str(c.DEFAULT_OUT), "generate_out": str(c.DEFAULT_GENERATE_OUT),
                  "cache": str(c.cache_dir())}))
"""


def test_the_installed_copy_runs_from_another_folder(installed, tmp_path):
    import json

    site, where = installed["site"], tmp_path / "elsewhere"
    where.mkdir()
    env = _env(tmp_path, PYTHONPATH=str(site))

    r = _run([PY, "-m", "pipeline", "--help"], where, env)
    assert r.returncode == 0, r.stderr
    assert "run" in r.stdout and "generate" in r.stdout

    r = _run([PY, "-c", PROBE], where, env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got.pop("file")) == site / "pipeline" / "__init__.py"  # the installed copy, not the checkout
    assert got == {"checkout": False, "root": None, "input": None, "generate_input": None, "out": "submit",
                   "generate_out": str(Path("submit") / "generate"),
                   "cache": str(tmp_path / "home" / ".cache" / "ernie-pipeline")}
    for extra, cache in (({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg" / "ernie-pipeline"),
                         ({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "PIPELINE_CACHE": str(tmp_path / "c")},
                          tmp_path / "c")):
        r = _run([PY, "-c", PROBE], where, {**env, **extra})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["cache"] == str(cache)

    # The console script: exits with main()'s status (0 for --help, 2 for a refused run).
    r = _run([installed["script"], "--help"], where, env)
    assert r.returncode == 0, r.stderr
    assert "run" in r.stdout
    r = _run([installed["script"], "run", "missing.tsv", "--model", "no-such-model", "--out", "out"], where, env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error:") and "no-such-model" in r.stderr
    # installed there is no embedded sample: no input is refused before any model is converted
    r = _run([installed["script"], "run"], where, env)
    assert r.returncode == 2 and "give input files" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "home" / ".cache").exists()  # nothing converted


# --------------------------------------------------------------------------- run.sh from another folder


def _stamp(*files: str) -> str:
    return hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in files)).hexdigest()


def _venv_installed(want: str) -> bool:
    """Whether run.sh would use .venv as it is (its stamps), so that it installs nothing."""
    def ok(kind: str, *files: str) -> bool:
        stamp = ROOT / ".venv" / f".installed-{kind}"
        return stamp.is_file() and stamp.read_text().strip() == _stamp(*files)

    test = ok("test", "requirements.txt", "requirements-model.txt", "requirements-test.txt", "requirements-quant.txt")
    return test or (want == "run" and ok("run", "requirements.txt", "requirements-model.txt"))


def _decoy(cwd: Path) -> None:
    """A folder named pipeline in the caller's folder: run.sh must not import it."""
    (cwd / "pipeline").mkdir(parents=True)
    (cwd / "pipeline" / "__init__.py").write_text("raise ImportError('the decoy in the current folder')\n")


@pytest.mark.skipif(not _venv_installed("run"), reason="the repository's .venv is not installed (./run.sh test makes it)")
def test_run_sh_takes_relative_paths_from_the_callers_folder(tmp_path, tiny_cross_dir):
    cwd = tmp_path / "caller"
    _decoy(cwd)
    (cwd / "in").mkdir()
    write_tsv(cwd / "in" / "pairs.tsv", sample_rows(2))
    model = os.path.relpath(tiny_cross_dir, cwd)
    env = _env(tmp_path, PIPELINE_CACHE=str(tmp_path / "cache"))
    r = _run([ROOT / "run.sh", "in/pairs.tsv", "--out", "out", "--model", model, "--no-progress",
              "--workers", "1", "--threads", "1"], cwd, env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("ranked.tsv", "predictions.tsv", "report.json"):
        assert (cwd / "out" / name).is_file(), name
    assert not (ROOT / "in").exists() and not (ROOT / "out").exists()

    r = _run([ROOT / "run.sh", "missing.tsv", "--out", "out2", "--model", model], cwd, env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "missing.tsv" in r.stderr and not (cwd / "out2").exists()


@pytest.mark.skipif(not _venv_installed("test"), reason="the repository's .venv has no test install (./run.sh test makes it)")
def test_run_sh_test_takes_the_callers_test_paths(tmp_path):
    one = "test_install.py::test_version_and_metadata_match_the_package"
    env = _env(tmp_path)
    cases = ((ROOT / "tests", one),  # the caller's relative path
             (tmp_path, f"tests/{one}"))  # not the caller's: the repository's
    _decoy(tmp_path)
    for cwd, arg in cases:
        r = _run([ROOT / "run.sh", "test", arg, "-q", "-p", "no:cacheprovider"], cwd, env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 passed" in r.stdout, r.stdout
