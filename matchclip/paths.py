"""Default locations of data, caches and runs.

Relative defaults resolve against the project folder: the checkout that
contains this package when it is installed in editable mode, otherwise the
current working directory. Set MATCHCLIP_HOME to put them elsewhere. This
makes notebooks and the command line find the same files from any working
directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    override = os.environ.get("MATCHCLIP_HOME")
    if override:
        return Path(override).expanduser().resolve()
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "notebooks").is_dir():
        return checkout
    return Path.cwd().resolve()


def data_dir() -> Path:
    return project_root() / "data"


def demo_dir() -> Path:
    """Folder of the generated demo data set (label file plus images)."""
    return data_dir() / "demo"


def real_labels_path() -> Path:
    return data_dir() / "psg" / "psg_cls_basic.json"


def real_image_root() -> Path:
    return data_dir() / "coco"


def cache_dir() -> Path:
    return project_root() / "cache"


def runs_dir() -> Path:
    return project_root() / "runs"


def reports_dir() -> Path:
    return project_root() / "reports"


def resolve(path: str | os.PathLike | None, default: Path) -> Path:
    """Return `path` as an absolute path, or `default` when it is None."""
    if path is None:
        return default
    return Path(path).expanduser().resolve()
