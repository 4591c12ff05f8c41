"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder under /tmp, removed afterwards: Unix socket paths must stay under 108
    bytes, and pytest's tmp_path can be longer."""
    root = Path(tempfile.mkdtemp(prefix="mid-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)
