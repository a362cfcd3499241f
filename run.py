#!/usr/bin/env python3
"""Start the campaignstats server with its defaults: embedded Postgres, schema, demo data.

``make run`` prepares the virtual environment and calls this; ``python run.py`` works too once
``.venv`` exists (it re-executes itself there). Extra arguments go to the command line tool.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE / ".venv" / "bin" / "python"


def main() -> int:
    # Not the venv: told by the prefix, as a venv's python is a symlink to the interpreter that
    # made it (the same file once resolved). Before any import: this folder is on sys.path, so
    # another python that has structlog imports campaignstats.cli, and fails later, in serve.
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != (HERE / ".venv").resolve():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    try:
        from campaignstats.cli import main as cli_main
    except ImportError:
        print("campaignstats is not installed here: run `make run` (it sets everything up)")
        return 2
    os.chdir(HERE)
    # Embedded Postgres in ./.campaignstats, schema created, demo data when empty, then serve,
    # following the database (docs/follow.md): rows written with psql move the counts live.
    return cli_main(["serve", "--demo-if-empty", "100000", "--follow", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
