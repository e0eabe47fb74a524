"""Progress bars that respect both the caller's switch and TQDM_DISABLE."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

_TRUE_WORDS = ("1", "true", "yes", "on")


def bars_disabled_by_environment() -> bool:
    """Return True when the TQDM_DISABLE environment variable is set to a true value (1, true, yes, on)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE_WORDS


def progress_bar(iterable: Any = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """Return a tqdm bar, disabled when `enabled` is false or TQDM_DISABLE is set.

    tqdm reads TQDM_DISABLE only once, at import, and an explicit `disable`
    argument overrides it. This function reads the variable on every call, so
    a notebook or a test can switch bars off after tqdm was imported.
    """
    options["disable"] = not enabled or bars_disabled_by_environment()
    return tqdm(iterable, **options)
