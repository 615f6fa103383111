"""Shared test data: a generated album of the astronaut, the awkward inputs in ../shared, dlib models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rigcli.demo import make_album
from rigcli.image.detect import FaceAnalyzer

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
    from rigcli.assets.ict import import_ict
    from rigcli.store import Store

    if not ICT.is_dir():
        pytest.fail(f"ICT FaceKit test data not found at {ICT}")
    store = Store(tmp_path_factory.mktemp("ict-home"))
    import_ict(ICT, store)
    return store


@pytest.fixture(scope="session")
def face_model():
    """The ICT FaceKit model the package ships (no import, no ../shared/assets/ict-facekit needed)."""
    from rigcli.face.ict import load_embedded_ict

    return load_embedded_ict()


@pytest.fixture(scope="session")
def imported_face_model(ict_store):
    """ICT FaceKit as imported from ../shared's copy: for the importer's own tests."""
    from rigcli.face.registry import load_face_model

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


NO_FACE_DATA = Path("/nonexistent-rig-face-data")


@pytest.fixture
def without_embedded_face_model(monkeypatch):
    """As if the package shipped no face model (a build that left its data out): only an imported
    ICT FaceKit counts, so the paths for a store with no face model at all can be exercised."""
    from rigcli.face import ict

    monkeypatch.setattr(ict, "_embedded_file", lambda name: NO_FACE_DATA / name)


def home_with_model(tmp_path: Path, ict_store=None) -> Path:
    """A fresh store root: with the package's face model, or holding a copy of ``ict_store``'s
    imported one when given."""
    import shutil

    home = tmp_path / "home"
    if ict_store is None:
        home.mkdir(parents=True, exist_ok=True)
    else:
        shutil.copytree(ict_store.root / "assets", home / "assets")
    return home
