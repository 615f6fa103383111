"""Stage 1 on a folder of photos, with two processes (DistributedDataParallel over gloo on the CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rigcli.cli import app
from rigcli.enroll import add_photos
from rigcli.store import Store
from rigcli.train.shards import prepare_shards
from tests.conftest import home_with_model


@pytest.mark.slow
def test_two_process_pretrain_then_finetune_from_it(tmp_path, album, inputs):
    home = home_with_model(tmp_path)
    faces = tmp_path / "faces"
    (faces / "nested").mkdir(parents=True)
    for item in album[:4]:
        shutil.copy(item.path, faces / "nested" / item.path.name)
    shutil.copy(inputs / "bad_zero.jpg", faces)
    shutil.copy(inputs / "bad_no_face.jpg", faces)
    out = tmp_path / "stage1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
               "-m", "rigcli", "--home", str(home), "pretrain", "--data", str(faces), "--out", str(out),
               "--steps", "4", "--batch", "2", "--checkpoint-every", "2"]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pre-trained on 4 photos (skipped: 1 no face, 1 unreadable) with 2 process(es)" in done.stdout
    info = json.loads((out / "model" / "model.json").read_text())
    assert info["processes"] == 2 and info["photos"] == {"used": 4, "unreadable": 1, "no face": 1}
    first, second = info["replica_digests"]
    assert first == second  # the two processes' weights stayed identical: gradients were all-reduced
    log = [json.loads(line) for line in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and log[-1]["processes"] == 2

    # preparing again finds everything done (resumable), with the same counts
    assert info["shards"] == 1 and 10_000 < info["bytes_per_photo"] < 20_000  # uint8 crops + parameters
    shards = sorted((out / "data").glob("shard-*"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    summary = prepare_shards(Store(home), faces, out / "data", 64)
    assert summary["rows"] == 4 and summary["counts"] == {"used": 4, "unreadable": 1, "no face": 1}
    assert [p.stat().st_mtime_ns for p in shards] == stamps

    # the stage-1 model is a base for stage 2
    runner = CliRunner()
    assert runner.invoke(app, ["--home", str(home), "models", "add", "generic", str(out / "model")]).exit_code == 0
    listed = runner.invoke(app, ["--home", str(home), "models", "list"], env={"COLUMNS": "200"})
    assert "generic" in listed.stdout
    add_photos(Store(home), "astro", [p.path for p in album[4:7]])
    tuned = runner.invoke(
        app, ["--home", str(home), "finetune", "astro", "--base", "generic", "--steps", "3", "--batch", "2"]
    )
    assert tuned.exit_code == 0, tuned.output
    assert "3 steps (base generic)" in tuned.stdout
