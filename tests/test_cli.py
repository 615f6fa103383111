"""The rig CLI through Typer's test runner, and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rigcli.cli import app
from tests.conftest import run_rig

runner = CliRunner()


def rig(home, *args):
    return runner.invoke(app, ["--home", str(home), *args], env={"COLUMNS": "200"})


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_add_list_show_remove(tmp_path, album):
    home = tmp_path / "home"
    result = rig(home, "add-person", "astro", str(album[0].path), str(album[1].path))
    assert result.exit_code == 0, result.output
    assert "added" in result.stdout and "2 photos, 2 used for training" in result.stdout

    listed = json.loads(rig(home, "people", "list", "--json").stdout)
    assert [(p["name"], p["photos"], p["train"]) for p in listed] == [("astro", 2, 2)]
    assert "astro" in rig(home, "people", "list").stdout

    shown = json.loads(rig(home, "people", "show", "astro", "--json").stdout)
    assert shown["name"] == "astro" and shown["schema_version"] == 1
    assert {p["source"] for p in shown["photos"]} == {album[0].path.name, album[1].path.name}
    assert all(os.path.isfile(p["aligned"]) for p in shown["photos"])
    table = rig(home, "people", "show", "astro")
    assert table.exit_code == 0 and shown["photos"][0]["id"] in table.stdout

    pid = shown["photos"][0]["id"]
    assert rig(home, "people", "remove-photo", "astro", pid[:8]).exit_code == 0
    assert len(json.loads(rig(home, "people", "show", "astro", "--json").stdout)["photos"]) == 1

    refused = rig(home, "people", "remove", "astro")  # not a terminal: needs --yes
    assert_one_line_error(refused, "--yes")
    assert rig(home, "people", "remove", "astro", "--yes").exit_code == 0
    assert json.loads(rig(home, "people", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    "args, words",
    [
        (["add-person", "alice", "{tmp}/missing"], ["does not exist"]),
        (["add-person", "alice", "{tmp}/empty"], ["holds no images"]),
        (["add-person", "alice", "{inputs}/bad_text.png"], ["nothing usable", "not an image"]),
        (["add-person", "alice", "{inputs}/bad_truncated.jpg"], ["nothing usable", "truncated"]),
        (["add-person", "alice", "{inputs}/bad_zero.jpg"], ["nothing usable", "empty file"]),
        (["add-person", "alice", "{inputs}/bad_bomb.png"], ["nothing usable", "80 MP"]),
        (["add-person", "alice", "{inputs}/bad_no_face.jpg"], ["nothing usable", "no face"]),
        (["add-person", "../x", "{inputs}/ok_webp.webp"], ["invalid person name"]),
        (["add-person", "a/b", "{inputs}/ok_webp.webp"], ["invalid person name"]),
        (["add-person", "", "{inputs}/ok_webp.webp"], ["invalid person name"]),
        (["add-person", ".", "{inputs}/ok_webp.webp"], ["invalid person name"]),
        (["add-person", "alice", "{inputs}/ok_webp.webp", "--size", "300"], ["unsupported crop size"]),
        (["people", "show", "nobody"], ["no person named 'nobody'"]),
        (["people", "remove", "nobody", "--yes"], ["no person named 'nobody'"]),
        (["people", "remove-photo", "nobody", "abcd"], ["no person named 'nobody'"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, inputs, args, words):
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, inputs=inputs) for a in args]
    result = rig(tmp_path / "home", *args)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "home" / "people" / "alice").exists()


def test_unwritable_store(tmp_path, inputs):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(rig(tmp_path / "file" / "home", "add-person", "a", str(inputs / "ok_webp.webp")), "cannot")


def test_name_differing_by_case(tmp_path, album):
    home = tmp_path / "home"
    assert rig(home, "add-person", "alice", str(album[0].path)).exit_code == 0
    assert_one_line_error(rig(home, "add-person", "Alice", str(album[1].path)), "differs only by case")
    assert_one_line_error(rig(home, "people", "show", "ALICE"), "did you mean 'alice'")


def test_folder_with_bad_files_skips_them(tmp_path, inputs):
    result = rig(tmp_path / "home", "add-person", "astro", str(inputs))
    assert result.exit_code == 0, result.output
    for word in ("unreadable", "no face", "too small", "2 faces found"):
        assert word in result.stdout


def test_assets_status(tmp_path, without_embedded_face_model):
    result = rig(tmp_path, "assets", "status")
    assert result.exit_code == 0
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 3}
    for name in ("shape_predictor_68_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat", "torch", "dlib"):
        assert "│ ok " in rows[name], rows
    assert "│ missing " in rows["face model (ICT FaceKit)"] and "download-ict" in rows["face model (ICT FaceKit)"]


def test_assets_status_names_the_face_model_in_the_package(tmp_path):
    result = rig(tmp_path, "assets", "status")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "face model (ICT FaceKit)" in line)
    assert "│ ok " in row and "ict-embedded-" in row and "in the package" in row


def test_device_auto_and_bad_devices():
    import torch

    from rigcli import RigError
    from rigcli.device import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") and resolve_device(" CPU ") == "cpu"
    with pytest.raises(RigError, match="write auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RigError, match="torch sees no CUDA GPU"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("command", [["edit", "astro", "x.jpg"], ["finetune", "astro"], ["eval", "astro"]])
def test_an_unusable_device_is_one_line(tmp_path, command):
    assert_one_line_error(rig(tmp_path, *command, "--device", "gpu"), "--device 'gpu'")


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["add-person"],
        ["people"],
        ["people", "list"],
        ["people", "show"],
        ["people", "remove"],
        ["people", "remove-photo"],
        ["assets", "status"],
        ["assets", "import-ict"],
        ["assets", "download-ict"],
        ["refit"],
        ["finetune"],
        ["pretrain"],
        ["models", "list"],
        ["models", "add"],
        ["model", "info"],
        ["demo"],
    ],
)
def test_help(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_subprocess_end_to_end(tmp_path, album):
    home = tmp_path / "home"
    added = run_rig("add-person", "astro", str(album[2].path), home=home)
    assert added.returncode == 0, added.stderr
    shown = run_rig("people", "show", "astro", "--json", home=home)
    assert json.loads(shown.stdout)["photos"][0]["source"] == album[2].path.name
    missing = run_rig("people", "show", "nobody", home=home)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_lock_held_by_another_process_is_reported(tmp_path, album):
    from tests.test_store import start_holder

    home = tmp_path / "home"
    holder = start_holder(home, 30)
    try:
        result = run_rig("add-person", "alice", str(album[0].path), home=home, env={"RIG_LOCK_TIMEOUT": "1"})
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    assert f"pid {holder.pid}" in result.stderr and "waiting" in result.stderr


def test_piped_tables_are_not_cut_to_80_columns(tmp_path):
    """Redirected to a file, a wide table (rig bench's has 11 columns) keeps its headers whole."""

    def render(env: dict) -> str:
        script = (
            "from rich.table import Table\nfrom rigcli.cli.common import out\n"
            "t = Table()\n"
            "for c in ('engine', 'batch', 'steps', 'ms / UNet call', 'edits/s', 'speed-up', 'peak MB', '% of peak',"
            " 'error / call', 'edit dB', 'note'): t.add_column(c)\n"
            "t.add_row('torch-fp16-cl-graphs', *['1'] * 10)\nout().print(t)\n"
        )
        path = tmp_path / "table.txt"
        with path.open("w") as sink:  # a file, not a terminal
            subprocess.run([sys.executable, "-c", script], stdout=sink, env=env, check=True)
        return path.read_text()

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = render(env)
    assert "torch-fp16-cl-graphs" in piped and "ms / UNet call" in piped and "…" not in piped
    assert max(len(line) for line in piped.splitlines()) <= 160
    narrow = render({**env, "COLUMNS": "80"})  # an explicit width still wins
    assert "…" in narrow and max(len(line) for line in narrow.splitlines()) <= 80
