"""Set up the project's virtual environment, then run the reports or the tests.

Usage, from the project folder, with nothing but Python installed:

    python -m matchclip.bootstrap run    # every notebook on the default data, rewrites reports/
    python -m matchclip.bootstrap test   # the test suite; notebooks run under pytest --nbval

The environment is .venv/ in the project folder. It is created on first use
and reinstalled only when pyproject.toml changes. This module uses the
standard library alone, because it runs before any dependency is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".matchclip-installed"

COMMANDS = {
    "run": ["-m", "matchclip.notebooks", "run"],
    "test": ["-m", "pytest", "--nbval", "tests", "notebooks"],
}


def venv_python() -> Path:
    scripts = "Scripts" if os.name == "nt" else "bin"
    return VENV / scripts / ("python.exe" if os.name == "nt" else "python")


def ensure_environment() -> Path:
    """Create .venv and install the package with its dev extra when needed."""
    requirement_hash = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    python = venv_python()
    if python.exists() and STAMP.is_file() and STAMP.read_text().strip() == requirement_hash:
        return python

    if not python.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing matchclip and its dependencies (the first time takes a few minutes)", flush=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev]"],
        check=True,
        cwd=ROOT,
    )
    STAMP.write_text(requirement_hash + "\n")
    return python


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    python = ensure_environment()
    command = [str(python), *COMMANDS[argv[0]], *argv[1:]]
    print("running: " + " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
