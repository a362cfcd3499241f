"""`pip install campaignstats` is the client and its codec, nothing of the server.

A web backend that only sends increments must not pull Postgres in (docs/design.md, "The
house"). The test builds a fresh venv, installs this repository into it without extras (from a
copy of the working tree, so that the build leaves nothing in the repository; the dependencies
come from PyPI), and checks from inside that venv that both clients import and that the
server's dependencies are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What a copy of the repository leaves out: environments, caches and build output.
_NOT_COPIED_NAMES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    ".campaignstats",
    "__pycache__",
    "*.pyc",
    ".*_cache",
    ".hypothesis",
    "build",
    "dist",
    "*.egg-info",
    "results",
    "node_modules",
)


def _not_copied(directory: str, names: list[str]) -> set[str]:
    """The names above, and whatever is neither a file nor a directory (a server's socket)."""
    skipped = set(_NOT_COPIED_NAMES(directory, names))
    for name in names:
        path = Path(directory, name)
        if not (path.is_file() or path.is_dir()):
            skipped.add(name)
    return skipped


# Run inside the fresh venv, from a directory that holds no campaignstats/, so that only the
# installed copy can be imported.
_PROBE = """
import importlib.metadata, importlib.util, json, sys

from campaignstats.client import AsyncStatsClient, StatsClient
import campaignstats, campaignstats.errors, campaignstats.model, campaignstats.protocol

def installed(dist):
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True

print(json.dumps({
    "clients": [AsyncStatsClient.__name__, StatsClient.__name__],
    "file": campaignstats.__file__,
    "version": campaignstats.__version__,
    "metadata_version": importlib.metadata.version("campaignstats"),
    "importable": {m: importlib.util.find_spec(m) is not None for m in sys.argv[1].split(",")},
    "installed": {d: installed(d) for d in sys.argv[2].split(",")},
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("asyncpg", "pgserver", "anyio")
                     or m.startswith(("campaignstats.server", "campaignstats.service",
                                      "campaignstats.actor", "campaignstats.db"))),
}))
"""


def _requirement_name(requirement: str) -> str:
    """``asyncpg>=0.29`` -> ``asyncpg`` (enough for the plain requirements of pyproject)."""
    for i, ch in enumerate(requirement):
        if not (ch.isalnum() or ch in "-_."):
            return requirement[:i]
    return requirement


def _run(cmd: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


# About 8 s on the 2-core VM, warm or cold pip cache: under the ~20 s that makes a test `slow`,
# so `make test` runs it. The timeout is generous for a slow index.
@pytest.mark.timeout(900)
def test_a_plain_install_has_both_clients_and_none_of_the_server(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=_not_copied, symlinks=True)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    python = venv / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        cwd=tmp_path,
        timeout=600,
    )

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    server_dists = [_requirement_name(r) for r in extras["server"]]
    assert {"asyncpg", "pgserver"} <= set(server_dists)
    out = _run(
        [str(python), "-c", _PROBE, "asyncpg,pgserver", ",".join(server_dists)],
        cwd=tmp_path,
        timeout=120,
    )
    probe = json.loads(out.stdout)

    assert probe["clients"] == ["AsyncStatsClient", "StatsClient"]
    assert Path(probe["file"]).is_relative_to(venv), "imported the repository, not the install"
    assert probe["importable"] == {"asyncpg": False, "pgserver": False}
    assert not any(probe["installed"].values()), probe["installed"]
    assert probe["loaded"] == [], "the client imported server-side modules"
    # The version is written once (campaignstats/_version.py) and the metadata reads it there.
    assert probe["version"] == probe["metadata_version"]
