"""Shared test data: a generated album of the astronaut, the awkward inputs in ../shared, dlib models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rigcli.demo import make_album
from rigcli.detect import FaceAnalyzer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RIG_SHARED", REPO.parent / "shared"))
INPUTS = SHARED / "assets" / "inputs"


@pytest.fixture(scope="session")
def inputs() -> Path:
    """The awkward photos of ../shared/assets/inputs (CMYK, EXIF rotation, 16-bit, bomb, ...)."""
    if not INPUTS.is_dir():
        pytest.fail(f"test inputs not found at {INPUTS}: clone the project beside ../shared or set RIG_SHARED")
    return INPUTS


@pytest.fixture(scope="session")
def album(tmp_path_factory):
    """Eight varied copies of the astronaut portrait with their known transforms."""
    return make_album(tmp_path_factory.mktemp("album"), count=8, seed=1)


@pytest.fixture(scope="session")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("hog")


def run_rig(*args: str, home: Path, env: dict | None = None, timeout: float = 120, **kwargs):
    """Run the CLI as a real subprocess (``python -m rigcli``) against store ``home``."""
    full_env = {**os.environ, "RIG_HOME": str(home), "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rigcli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        **kwargs,
    )


ICT = SHARED / "assets" / "ict-facekit"


@pytest.fixture(scope="session")
def ict_store(tmp_path_factory):
    """A store with ICT FaceKit imported from ../shared (the import runs once per test session)."""
    from rigcli.facemodel import import_ict
    from rigcli.store import Store

    if not ICT.is_dir():
        pytest.fail(f"ICT FaceKit test data not found at {ICT}")
    store = Store(tmp_path_factory.mktemp("ict-home"))
    import_ict(ICT, store)
    return store


@pytest.fixture(scope="session")
def face_model(ict_store):
    from rigcli.facemodel import load_face_model

    return load_face_model(ict_store)
