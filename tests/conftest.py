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


@pytest.fixture(scope="session")
def ict_zip(tmp_path_factory) -> Path:
    """ICT-FaceKit packed like the repository's zip (ICT-FaceKit-master/FaceXModel/...), with the
    neutral mesh as plain .obj and the rest as .obj.gz, so both readers are exercised."""
    import gzip
    import zipfile

    archive = tmp_path_factory.mktemp("zip") / "ICT-FaceKit-master.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for path in (ICT / "FaceXModel").iterdir():
            name = f"ICT-FaceKit-master/FaceXModel/{path.name}"
            if path.name == "generic_neutral_mesh.obj.gz":
                z.writestr(name[: -len(".gz")], gzip.decompress(path.read_bytes()))
            else:
                z.write(path, name)
        z.write(ICT / "LICENSE", "ICT-FaceKit-master/LICENSE")
    return archive


def home_with_model(tmp_path: Path, ict_store) -> Path:
    """A fresh store root holding a copy of the imported face model."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(ict_store.root / "assets", home / "assets")
    return home
