"""Shared fixtures: small label files written on the fly and the real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# The real PSG files and three COCO images live beside the checkout in CI
# and on developer machines; they are never copied into the repository.
SHARED_DATA = Path(
    os.environ.get(
        "MATCHCLIP_SHARED_DATA",
        Path(__file__).resolve().parents[1].parent / "shared" / "data",
    )
)


@pytest.fixture
def shared_data() -> Path:
    """Folder with the real psg_cls_basic.json, COCO images and a submission."""
    if not (SHARED_DATA / "psg" / "psg_cls_basic.json").is_file():
        pytest.skip(
            f"real PSG data not found at {SHARED_DATA}; "
            "set MATCHCLIP_SHARED_DATA to the folder that holds psg/ and coco/"
        )
    return SHARED_DATA


@pytest.fixture
def write_label_file(tmp_path):
    """Return a function that writes a PSG label file and returns its path."""

    def write(payload: dict | str, name: str = "psg_cls_basic.json") -> Path:
        path = tmp_path / name
        if isinstance(payload, str):
            path.write_text(payload, encoding="utf-8")
        else:
            path.write_text(json.dumps(payload), encoding="utf-8")
        return path

    return write
