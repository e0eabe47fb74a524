"""Settings for `pytest --nbval notebooks/`, applied without extra command-line options.

- Outputs are sanitised with nbval_sanitize.cfg (its comments say why each rule exists).
- Notebooks run in the Python environment that runs pytest (--nbval-current-env), so a global "python3"
  kernel of another installation is never picked up.
- Tables, figures and the README go to a temporary folder (MATCHCLIP_REPORTS_DIR), so a test run leaves the
  committed reports/ unchanged. Trained runs and feature caches still go to runs/ and cache/ and are reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SANITIZE_FILE = Path(__file__).resolve().with_name("nbval_sanitize.cfg")


def pytest_configure(config) -> None:
    option = config.option
    if not (getattr(option, "nbval", False) or getattr(option, "nbval_lax", False)):
        return

    if not option.nbval_sanitize_with:
        option.nbval_sanitize_with = str(SANITIZE_FILE)
    if option.nbval_kernel_name is None:
        option.nbval_current_env = True

    os.environ.setdefault("TQDM_DISABLE", "1")
    if "MATCHCLIP_REPORTS_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="matchclip-nbval-reports-")
        os.environ["MATCHCLIP_REPORTS_DIR"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
