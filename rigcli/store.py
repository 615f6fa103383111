"""The identity store: one folder per person under one root, written atomically and locked.

Layout (readable and easy to back up)::

    ROOT/
      people/NAME/person.json          manifest: schema version, photos, settings
      people/NAME/photos/ID.jpg        originals as given (ID = first 16 hex of their SHA-256)
      people/NAME/aligned/ID.png       FFHQ-aligned crops
      people/NAME/faces/ID.json        face box, 68 landmarks, crop transform, 128-D embedding
      locks/name.lock                  who is working on a person (pid, command, since)

Every file is written to a temporary name, fsynced and renamed into place. Files are committed
before the manifest that references them, so an interrupted command leaves at most unreferenced
files, which the next command on that person removes while holding the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rigcli import RigError
from rigcli.files import _TMP_PREFIX, _TRASH_PREFIX, _fsync_dir, atomic_write_bytes, atomic_write_json, now_iso

SCHEMA_VERSION = 1


MANIFEST = "person.json"


PHOTO_DIRS = ("photos", "aligned", "faces")
"""Folders of per-photo files that the manifest owns; anything there it does not list is a leftover."""


NAME_RULE = "letters, digits, '-' and '_', at most 64 characters"


_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


LOCK_TIMEOUT_ENV = "RIG_LOCK_TIMEOUT"


DEFAULT_LOCK_TIMEOUT = 600.0


def default_home() -> Path:
    """The platform's per-user data folder for rig (e.g. ~/.local/share/rig on Linux)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("rig", appauthor=False))


def resolve_home(home: Path | str | None = None) -> Path:
    """Store root: the explicit ``home``, else $RIG_HOME, else the platform's user data folder."""
    chosen = home or os.environ.get("RIG_HOME") or default_home()
    return Path(chosen).expanduser().absolute()


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid person name, else raise a RigError saying why."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = repr(name) if name else "an empty name"
        raise RigError(f"invalid person name {shown}: use {NAME_RULE}")
    return name


@dataclass
class LockHolder:
    """What a lock file says about the process holding it."""

    pid: int
    host: str
    command: str
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.command}) since {self.since}"


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt  # the platform's own locking module: each exists on one platform only

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_holder(path: Path) -> LockHolder | None:
    try:
        return LockHolder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def hold_lock(
    path: Path,
    timeout: float | None = None,
    on_wait: Callable[[LockHolder | None], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive OS lock on ``path`` (released by the OS if the process dies).

    If another process holds it, ``on_wait`` is told who, and we wait up to ``timeout`` seconds
    (default $RIG_LOCK_TIMEOUT or 600) before giving up with a RigError that names the holder.
    """
    if timeout is None:
        timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        told = False
        while not _try_lock(fd):
            holder = _read_holder(path)
            if time.monotonic() >= deadline:
                who = holder.describe() if holder else "another rig process"
                raise RigError(f"{path.stem} is busy: locked by {who}; try again when it finishes")
            if on_wait and not told:
                on_wait(holder)
                told = True
            time.sleep(0.1)
        holder = LockHolder(os.getpid(), socket.gethostname(), " ".join(_command_line()), now_iso())
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(asdict(holder)).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            _unlock(fd)
    finally:
        os.close(fd)


def _command_line() -> list[str]:
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name
    return argv[:8]


@dataclass
class PhotoRecord:
    """One stored photo of a person, as listed in the manifest."""

    id: str
    source: str
    original: str  # paths relative to the person's folder
    aligned: str
    face: str
    added: str
    status: str = "ok"  # "ok" or "outlier"
    train: bool = True
    outlier_distance: float | None = None


@dataclass
class Manifest:
    """A person's manifest (``person.json``)."""

    name: str
    created: str
    updated: str
    align_size: int
    schema_version: int = SCHEMA_VERSION
    keep_outliers: bool = False
    photos: list[PhotoRecord] = field(default_factory=list)

    def find_photo(self, photo_id: str) -> PhotoRecord | None:
        return next((p for p in self.photos if p.id == photo_id), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RigError(
                f"person {data.get('name')!r} was written with store schema {version}; this rig reads "
                f"schema {SCHEMA_VERSION} (upgrade rig)"
            )
        fields = dict(data)
        fields["photos"] = [PhotoRecord(**p) for p in data.get("photos", [])]
        return cls(**fields)


class Store:
    """The identity store rooted at one folder; see the module docstring for the layout."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = resolve_home(root)

    @property
    def people_dir(self) -> Path:
        return self.root / "people"

    def person_dir(self, name: str) -> Path:
        return self.people_dir / check_name(name)

    def model_dir(self, name: str) -> Path:
        """Where a person's fine-tuned model lives (it may not exist yet)."""
        return self.person_dir(name) / "model"

    def require_model(self, name: str, model: Path | None = None) -> Path:
        """The model folder to use for a person: ``model`` when given, else their fine-tuned one;
        either must hold a saved model (model.json), else a RigError says how to make one."""
        self.require(name)
        folder = Path(model) if model is not None else self.model_dir(name)
        if not (folder / "model.json").is_file():
            raise RigError(f"{name} has no fine-tuned model: run `rig finetune {name}` first (or pass --model DIR)")
        return folder

    def lock_path(self, name: str) -> Path:
        # one lock per case-folded name, so "Alice" and "alice" cannot be created at once
        return self.root / "locks" / f"{check_name(name).lower()}.lock"

    # -- reading

    def people(self) -> list[str]:
        """Names of the people in the store, sorted case-insensitively."""
        if not self.people_dir.is_dir():
            return []
        names = [
            p.name
            for p in self.people_dir.iterdir()
            if p.is_dir() and _NAME_RE.fullmatch(p.name) and (p / MANIFEST).is_file()
        ]
        return sorted(names, key=str.lower)

    def exists(self, name: str) -> bool:
        return (self.person_dir(name) / MANIFEST).is_file()

    def require(self, name: str) -> str:
        """Return ``name`` if that person exists; else a RigError (with the near miss, if any)."""
        check_name(name)
        if self.exists(name):
            return name
        near = [p for p in self.people() if p.lower() == name.lower()]
        if near:
            raise RigError(f"no person named {name!r} (names are case-sensitive; did you mean {near[0]!r}?)")
        known = ", ".join(self.people()) or "none yet; add one with `rig add-person NAME PHOTOS`"
        raise RigError(f"no person named {name!r} in {self.root} (people: {known})")

    def check_new_name(self, name: str) -> None:
        """Refuse a new name that differs only by case from an existing person."""
        check_name(name)
        clash = [p for p in self.people() if p.lower() == name.lower() and p != name]
        if clash:
            raise RigError(f"cannot add {name!r}: it differs only by case from existing person {clash[0]!r}")

    def load(self, name: str) -> Manifest:
        """Read a person's manifest."""
        path = self.person_dir(self.require(name)) / MANIFEST
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise RigError(f"the manifest {path} is damaged ({exc})") from exc

    # -- writing (callers hold the person's lock)

    def ensure_writable(self) -> None:
        """Create the store root if needed and prove it is writable, or raise a one-line RigError."""
        try:
            self.people_dir.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RigError(
                f"the store folder {self.root} cannot be created or written ({exc.strerror or exc})"
            ) from exc

    @contextlib.contextmanager
    def locked(self, name: str, on_wait: Callable[[LockHolder | None], None] | None = None) -> Iterator[None]:
        """Hold the person's lock, then tidy what an interrupted command may have left."""
        self.ensure_writable()
        with hold_lock(self.lock_path(name), on_wait=on_wait):
            self._clean_trash()
            if self.exists(name):
                self.collect_garbage(name)
            yield

    def save(self, manifest: Manifest) -> None:
        """Atomically write a person's manifest (creating the person on first save)."""
        manifest.updated = now_iso()
        atomic_write_json(self.person_dir(manifest.name) / MANIFEST, manifest.to_json())

    def write_file(self, name: str, relative: str, data: bytes) -> Path:
        """Atomically write one file inside a person's folder."""
        path = self.person_dir(name) / relative
        atomic_write_bytes(path, data)
        return path

    def collect_garbage(self, name: str) -> list[Path]:
        """Delete files in a person's folder that the manifest does not reference (leftovers of a kill)."""
        folder = self.person_dir(name)
        manifest = self.load(name)
        keep = {MANIFEST}
        for photo in manifest.photos:
            keep.update({photo.original, photo.aligned, photo.face})
        candidates = [p for sub in PHOTO_DIRS for p in (folder / sub).glob("*")]
        candidates += folder.rglob(f"{_TMP_PREFIX}*")
        removed = []
        for path in sorted(set(candidates)):
            if path.is_file() and path.relative_to(folder).as_posix() not in keep:
                path.unlink()
                removed.append(path)
        return removed

    def remove_files(self, name: str, relatives: list[str]) -> None:
        """Delete files of a person that the manifest no longer references."""
        for rel in relatives:
            with contextlib.suppress(FileNotFoundError):
                (self.person_dir(name) / rel).unlink()

    def remove_person(self, name: str) -> None:
        """Delete a person: their folder is renamed away in one step, then removed."""
        folder = self.person_dir(self.require(name))
        trash = self.root / f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)
        _fsync_dir(self.people_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_trash(self) -> None:
        for path in self.root.glob(f"{_TRASH_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def registry_dir(store) -> Path:
    return store.root / "models"


def registered_models(store) -> dict[str, dict]:
    """Base models registered in the store, by name, with their model.json."""
    folder = registry_dir(store)
    if not folder.is_dir():
        return {}
    return {
        p.name: json.loads((p / "model.json").read_text())
        for p in sorted(folder.iterdir())
        if (p / "model.json").is_file() and not p.name.startswith(".")  # not an import being built
    }
