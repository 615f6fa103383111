"""Shared test data: a generated album of the astronaut, the awkward inputs in ../shared, dlib models,
and people fitted and trained once for every module that only needs a model (kept in pytest's cache)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import shutil
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
    home = tmp_path / "home"
    if ict_store is None:
        home.mkdir(parents=True, exist_ok=True)
    else:
        shutil.copytree(ict_store.root / "assets", home / "assets")
    return home


# ---------------------------------------------------------------- trained people, shared and cached

REAL = SHARED / "assets" / "real"

TINY_FROM_SCRATCH = {"from_scratch": True, "preset_name": "tiny"}

TRAINED_PEOPLE: dict[str, tuple[tuple[str, ...], dict | None]] = {
    # name: (photos: "album:I" is the album fixture's photo I, "real:FILE" one of ../shared/assets/real;
    #        finetune's settings, None for a person with photos only). Each is the recipe its module used
    #        when it trained the person itself: training is seeded, so the model is the one it trained.
    # tests/test_edit.py: the astronaut album's first six copies, 200 steps
    "astro": (
        tuple(f"album:{i}" for i in range(6)),
        {**TINY_FROM_SCRATCH, "steps": 200, "batch": 4, "lr": 3e-4, "checkpoint_every": 200},
    ),
    # tests/test_real_edit.py: A's three photos, trained briefly; B's album, no model
    "a": (
        ("real:obama-1.jpg", "real:obama-2.jpg", "real:obama-3.jpg"),
        {**TINY_FROM_SCRATCH, "steps": 120, "batch": 3, "lr": 3e-4, "checkpoint_every": 120},
    ),
    "b": (("real:biden-1.jpg", "real:biden-2.jpg"), None),
    # tests/test_studio.py: the same three photos, 30 steps; a second person with a photo but no model
    "obama": (
        ("real:obama-1.jpg", "real:obama-2.jpg", "real:obama-3.jpg"),
        {**TINY_FROM_SCRATCH, "steps": 30, "batch": 2, "checkpoint_every": 30},
    ),
    "biden": (("real:biden-2.jpg",), None),
}

TRAINED_CACHE = "rig-trained-people"


def build_person(folder: Path, name: str, photos: list[Path]) -> Path:
    """``name`` added from ``photos`` into a fresh store under ``folder`` and fine-tuned as
    TRAINED_PEOPLE says: the person's folder. The finished run's resume state (training/: the
    weights with Adam's moments, 200 MB) is left out: no test of a shared person reads it."""
    from rigcli.enroll import add_photos
    from rigcli.store import Store
    from rigcli.train.stages import finetune

    store = Store(home_with_model(folder))
    add_photos(store, name, photos)
    training = TRAINED_PEOPLE[name][1]
    if training is not None:
        finetune(store, name, **training)
        shutil.rmtree(store.person_dir(name) / "training")
    return store.person_dir(name)


_CODE_DIGEST: list[str] = []


def code_digest() -> str:
    """SHA-256 over every file of the packages (their .py files and the embedded face model's data)."""
    if not _CODE_DIGEST:
        digest = hashlib.sha256()
        for top in ("rigcli", "engines"):
            for path in sorted((REPO / top).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
        _CODE_DIGEST.append(digest.hexdigest())
    return _CODE_DIGEST[0]


def person_key(name: str, photos: list[Path]) -> str:
    """What the trained person depends on: the code, the recipe and how it is built, the photos' names
    and bytes, the library versions and the threads torch computes with (float sums follow them)."""
    import numpy
    import torch

    digest = hashlib.sha256()
    digest.update(code_digest().encode())
    digest.update(repr((name, TRAINED_PEOPLE[name])).encode())
    digest.update(inspect.getsource(build_person).encode())
    for path in photos:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    digest.update(f"torch {torch.__version__} numpy {numpy.__version__} threads {torch.get_num_threads()}".encode())
    return digest.hexdigest()[:20]


class TrainedPeople:
    """The people of TRAINED_PEOPLE for this session: each added and trained on first use, or copied
    from pytest's cache (``.pytest_cache``), where a finished one is kept under a key of everything it
    depends on (``person_key``), so a change to the code retrains it. A test gets its own copy."""

    def __init__(self, tmp_path_factory, album, cache_dir: Path | None):
        self.factory, self.album, self.cache_dir = tmp_path_factory, album, cache_dir
        self.folders: dict[str, Path] = {}

    def home(self, folder: Path, *names: str) -> Path:
        """A fresh store root under ``folder`` (as ``home_with_model`` makes it) holding a copy of ``names``."""
        home = home_with_model(folder)
        for name in names:
            shutil.copytree(self.person(name), home / "people" / name)
        return home

    def photos(self, name: str) -> list[Path]:
        found = []
        for spec in TRAINED_PEOPLE[name][0]:
            kind, _, which = spec.partition(":")
            found.append(self.album[int(which)].path if kind == "album" else REAL / which)
        if not all(p.is_file() for p in found):
            pytest.fail(f"the photos of {name} are needed: {', '.join(map(str, found))}")
        return found

    def person(self, name: str) -> Path:
        """The person's folder, fitted and trained: never written to (``home`` copies it)."""
        if name not in self.folders:
            self.folders[name] = self._cached(name) if self.cache_dir is not None else self._build(name)
        return self.folders[name]

    def _build(self, name: str) -> Path:
        return build_person(self.factory.mktemp(f"person-{name}"), name, self.photos(name))

    def _cached(self, name: str) -> Path:
        photos = self.photos(name)
        entry = self.cache_dir / f"{name}-{person_key(name, photos)}"
        if entry.is_dir():
            return entry
        built = build_person(self.factory.mktemp(f"person-{name}"), name, photos)
        # copied beside the entry and renamed into place: an interrupted session leaves no half person
        staging = self.cache_dir / f".tmp-{entry.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(built, staging)
        try:
            staging.rename(entry)
        except OSError:  # another session put it there first
            shutil.rmtree(staging, ignore_errors=True)
        for old in self.cache_dir.iterdir():  # the versions of this person the code has left behind
            stale = old.name.rsplit("-", 1)[0] == name or (
                old.name.startswith(f".tmp-{name}-") and not pid_alive(int(old.name.rsplit("-", 1)[1]))
            )
            if stale and old != entry:
                shutil.rmtree(old, ignore_errors=True)
        return entry


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@pytest.fixture(scope="session")
def trained_people(request, tmp_path_factory, album) -> TrainedPeople:
    """Fitted, trained people shared by the modules that only need a model (see TRAINED_PEOPLE): use
    ``trained_people.home(folder, "astro")`` for a store of one's own holding them."""
    cache, cache_dir = getattr(request.config, "cache", None), None  # None with -p no:cacheprovider
    if cache is not None:
        with contextlib.suppress(OSError):  # a read-only checkout: built every session
            cache_dir = cache.mkdir(TRAINED_CACHE)
    return TrainedPeople(tmp_path_factory, album, cache_dir)
