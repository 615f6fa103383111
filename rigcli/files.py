"""Files written whole or not at all: temporary name, fsync, rename; hashes and timestamps.

The one place every writer (the store, model and engine caches, imports) goes through, so that a
command killed mid-way leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TMP_PREFIX = ".tmp-"


_TRASH_PREFIX = ".trash-"


def now_iso() -> str:
    """Current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fault_point(path.name)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write an object as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _fault_point(filename: str) -> None:
    """Test hook: with RIG_FAULT=pause:NAME, stop between writing NAME's temp file and renaming it.

    Lets the tests kill a real process in the middle of a write, deterministically.
    """
    fault = os.environ.get("RIG_FAULT", "")
    if fault == f"pause:{filename}":
        sys.stderr.write(f"RIG_FAULT: paused before renaming {filename}\n")
        sys.stderr.flush()
        while True:
            time.sleep(1)


def file_sha256(path: Path, on_chunk: Callable[[int, int], None] | None = None) -> str:
    """SHA-256 of a file read in 4 MiB chunks; ``on_chunk(done, total)`` after each (for progress bars)."""
    digest = hashlib.sha256()
    total, done = Path(path).stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            done += len(chunk)
            if on_chunk:
                on_chunk(done, total)
    return digest.hexdigest()
