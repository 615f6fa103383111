"""The identity store: names, home resolution, atomic writes and locks, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rigcli import RigError
from rigcli.files import atomic_write_bytes, now_iso
from rigcli.store import Manifest, Store, check_name, hold_lock, resolve_home


@pytest.mark.parametrize("name", ["alice", "Bob_2", "a-b", "x" * 64, "0"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "x" * 65, "al ice", "é", "a.b", "-\n"])
def test_invalid_names_are_refused(name):
    with pytest.raises(RigError, match="invalid person name"):
        check_name(name)


def test_home_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("RIG_HOME", str(tmp_path / "env"))
    assert resolve_home(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_home(None) == tmp_path / "env"
    monkeypatch.delenv("RIG_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_home(None) == tmp_path / "xdg" / "rig"


def new_person(store: Store, name: str) -> Manifest:
    manifest = Manifest(name, now_iso(), now_iso(), 256)
    with store.locked(name):
        store.save(manifest)
    return manifest


def test_names_differing_only_by_case_are_refused(tmp_path):
    store = Store(tmp_path)
    new_person(store, "alice")
    with pytest.raises(RigError, match="differs only by case"):
        store.check_new_name("Alice")
    with pytest.raises(RigError, match="did you mean 'alice'"):
        store.require("ALICE")
    assert store.lock_path("Alice") == store.lock_path("alice")


def test_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RigError, match="cannot be created or written"):
        Store(blocker / "home").ensure_writable()
    with pytest.raises(RigError, match="cannot be created or written"):
        Store("/proc/rig-home").ensure_writable()  # not writable even for root


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left


def test_kill_during_a_write_keeps_the_old_file(tmp_path):
    """A real process is killed between writing the temp file and renaming it."""
    store = Store(tmp_path)
    new_person(store, "alice")
    manifest_path = store.person_dir("alice") / "person.json"
    before = manifest_path.read_bytes()
    script = textwrap.dedent(
        f"""
        from rigcli.store import Store
        store = Store({str(tmp_path)!r})
        with store.locked("alice"):
            m = store.load("alice")
            m.keep_outliers = True
            store.save(m)
        """
    )
    env = {**os.environ, "RIG_FAULT": "pause:person.json"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert "paused" in proc.stderr.readline()
        temps = list(store.person_dir("alice").glob(".tmp-person.json-*"))
        assert len(temps) == 1 and json.loads(temps[0].read_text())["keep_outliers"] is True
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    assert manifest_path.read_bytes() == before  # readers still see the old, whole manifest
    assert store.load("alice").keep_outliers is False
    with store.locked("alice"):  # the next command tidies the leftover
        pass
    assert not list(store.person_dir("alice").glob(".tmp-*"))


HOLDER = textwrap.dedent(
    """
    import sys, time
    from rigcli.store import Store
    store = Store(sys.argv[1])
    with store.locked("alice"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def start_holder(home: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(home), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_names_its_holder_and_times_out(tmp_path):
    holder = start_holder(tmp_path, 30)
    try:
        with pytest.raises(RigError) as info:
            with hold_lock(Store(tmp_path).lock_path("alice"), timeout=0.5):
                pass
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "busy" in message
    finally:
        holder.kill()
        holder.wait()


def test_second_command_waits_for_the_first(tmp_path):
    holder = start_holder(tmp_path, 1.5)
    seen = []
    started = time.monotonic()
    with hold_lock(Store(tmp_path).lock_path("alice"), timeout=30, on_wait=seen.append):
        waited = time.monotonic() - started
        assert holder.poll() is not None or holder.wait(5) == 0  # the holder had finished first
    assert waited > 0.5
    assert len(seen) == 1 and seen[0].pid == holder.pid


def test_lock_of_a_killed_process_is_free(tmp_path):
    holder = start_holder(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with hold_lock(Store(tmp_path).lock_path("alice"), timeout=2):
        pass


def test_garbage_collection_removes_only_unreferenced_photo_files(tmp_path):
    store = Store(tmp_path)
    new_person(store, "alice")
    folder = store.person_dir("alice")
    (folder / "photos").mkdir()
    orphan = folder / "photos" / "0123456789abcdef.jpg"
    orphan.write_bytes(b"x")
    other = folder / "models" / "keep.safetensors"  # folders the manifest does not own are left alone
    other.parent.mkdir()
    other.write_bytes(b"y")
    assert store.collect_garbage("alice") == [orphan]
    assert other.exists()


def test_remove_person_stays_inside_the_store(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    store = Store(tmp_path / "home")
    new_person(store, "alice")
    with store.locked("alice"):
        store.remove_person("alice")
    assert store.people() == [] and outside.read_text() == "keep me"
    assert sorted(p.name for p in store.root.iterdir()) == ["locks", "people"]


def test_newer_schema_is_refused(tmp_path):
    store = Store(tmp_path)
    new_person(store, "alice")
    path = store.person_dir("alice") / "person.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(RigError, match="schema 99"):
        store.load("alice")
