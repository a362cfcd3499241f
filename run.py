#!/usr/bin/env python3
"""Start campaignstats with its defaults: embedded Postgres, schema, demo data when empty.

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
    try:
        from campaignstats.cli import main as cli_main
    except ImportError:
        if VENV_PYTHON.exists() and Path(sys.executable).resolve() != VENV_PYTHON.resolve():
            os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])
        print("campaignstats is not installed here: run `make run` (it sets everything up)")
        return 2
    os.chdir(HERE)
    return cli_main(["quickstart", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
