"""Training: learning is real, stage 2 keeps the encoder, resume after a kill is exact, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from rigcli import RigError
from rigcli.cli import app
from rigcli.diffusion.checkpoints import load_model, save_model
from rigcli.diffusion.registry import register_model
from rigcli.diffusion.schedule import Diffusion
from rigcli.diffusion.unet import DiffusionRig, preset
from rigcli.enroll import add_photos, refit
from rigcli.image.metrics import psnr
from rigcli.store import Store
from rigcli.train.data import person_data
from rigcli.train.loop import TrainConfig, train
from rigcli.train.stages import finetune
from tests.conftest import home_with_model


@pytest.fixture(scope="module")
def fitted_home(tmp_path_factory, album):
    """A store holding the astronaut album, added and fitted."""
    home = home_with_model(tmp_path_factory.mktemp("train"))
    add_photos(Store(home), "astro", [p.path for p in album])
    return home


def x0_psnr(model: DiffusionRig, data, t: int = 500) -> float:
    """PSNR of the x0 estimate from training photos noised to timestep t (fixed noise)."""
    d = Diffusion()
    x0 = data.images
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    steps = torch.full((len(x0),), t)
    with torch.no_grad():
        model.eval()
        x_t = d.q_sample(x0, steps, noise)
        eps = model(x_t, steps, data.buffers, model.encode(x0))
    return psnr(d.predict_x0(x_t, steps, eps), x0, value_range=(-1, 1))


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_tiny_model_learns_from_scratch(fitted_home, tmp_path):
    data = person_data(Store(fitted_home), "astro", 64)
    assert data.images.shape == (8, 3, 64, 64) and data.buffers.shape == (8, 9, 64, 64)
    torch.manual_seed(0)
    model = DiffusionRig(preset("tiny"))
    before = x0_psnr(model, data)
    cfg = TrainConfig(steps=150, batch=4, lr=2e-4, ema_decay=0.95, freeze_encoder=False, checkpoint_every=150)
    ema = train(model, data, cfg, tmp_path / "run", {})
    curve = losses(tmp_path / "run")
    assert sum(curve[-3:]) / 3 < 0.5 * sum(curve[:2]) / 2, curve
    after = x0_psnr(ema, data)
    assert after > before + 2.0, (before, after)


def test_stage_two_trains_the_unet_with_the_encoder_frozen(fitted_home, tmp_path):
    store = Store(fitted_home)
    torch.manual_seed(1)
    base = DiffusionRig(preset("tiny"))
    data = person_data(store, "astro", 64)
    save_model(tmp_path / "base", base, {"face_model_id": data.face_model_id, "steps": 0})
    register_model(store, "generic", tmp_path / "base")
    before = x0_psnr(base, data)
    info = finetune(store, "astro", base="generic", steps=150, lr=2e-4, checkpoint_every=150, restart=True)
    tuned, meta = load_model(store.person_dir("astro") / "model")
    assert meta["base"] == "generic" and info["train"]["freeze_encoder"] is True
    for (name, a), b in zip(base.encoder.state_dict().items(), tuned.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"encoder tensor {name} changed in stage 2"
    assert x0_psnr(tuned, data) > before + 2.0
    shown = CliRunner().invoke(app, ["--home", str(fitted_home), "people", "show", "astro", "--json"])
    assert json.loads(shown.stdout)["model"]["base"] == "generic"


def test_base_model_of_another_face_model_is_refused(fitted_home, tmp_path):
    store = Store(fitted_home)
    save_model(tmp_path / "flame", DiffusionRig(preset("tiny")), {"face_model_id": "flame-0123456789abcdef"})
    register_model(store, "flamebase", tmp_path / "flame")
    with pytest.raises(RigError, match="face model flame-0123456789abcdef"):
        finetune(store, "astro", base="flamebase", steps=2)
    with pytest.raises(RigError, match="--from-scratch"):
        finetune(store, "astro")
    with pytest.raises(RigError, match="no base model named"):
        finetune(store, "astro", base="nope")
    with pytest.raises(RigError, match="already registered"):
        register_model(store, "flamebase", tmp_path / "flame")


def run_finetune(home, *extra):
    args = ["finetune", "astro", "--from-scratch", "--steps", "16", "--batch", "2", "--checkpoint-every", "4", *extra]
    env = {**os.environ, "RIG_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "rigcli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def final_weights(home) -> dict[str, torch.Tensor]:
    model, _ = load_model(home / "people" / "astro" / "model")
    return model.state_dict()


@pytest.mark.parametrize("augment", [[], ["--augment", "--augment-copies", "2"]], ids=["album", "augmented"])
def test_resume_after_kill_matches_an_uninterrupted_run(fitted_home, tmp_path, augment):
    """Killed mid-run and resumed, a fine-tune ends with the weights of one never killed: with
    augmented copies too (issue 15: their draw and mirroring are part of the resumed state)."""
    import shutil

    homes = {}
    for label in ("straight", "killed"):
        homes[label] = tmp_path / label
        shutil.copytree(fitted_home, homes[label], ignore=shutil.ignore_patterns("training", "model", "models"))
    straight = run_finetune(homes["straight"], *augment)
    assert straight.wait(300) == 0, straight.stderr.read().decode()

    pointer = homes["killed"] / "people" / "astro" / "training" / "latest.json"
    proc = run_finetune(homes["killed"], *augment)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 8:
            break
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed_at = json.loads(pointer.read_text())["step"]
    assert 8 <= killed_at < 16
    assert not (homes["killed"] / "people" / "astro" / "model").exists()
    resumed = run_finetune(homes["killed"], *augment)
    assert resumed.wait(300) == 0, resumed.stderr.read().decode()
    a, b = final_weights(homes["straight"]), final_weights(homes["killed"])
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    # other settings do not silently resume the old run
    other = run_finetune(homes["killed"], *augment, "--lr", "0.001")
    assert other.wait(120) == 2 and b"other data or settings" in other.stderr.read()


def test_training_cache_follows_the_fit(fitted_home):
    store = Store(fitted_home)
    first = person_data(store, "astro", 64)
    assert person_data(store, "astro", 64).data_hash == first.data_hash  # cached
    time.sleep(1.1)  # the fit's timestamp has one-second resolution
    refit(store, "astro")
    again = person_data(store, "astro", 64)
    assert again.data_hash != first.data_hash
    assert len(list((store.person_dir("astro") / "cache").glob("train-64-*"))) == 1


def test_model_info_cli():
    result = CliRunner().invoke(app, ["model", "info", "--preset", "paper", "--batch", "4"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "133.4 M" in result.stdout and "555.8" in result.stdout and "11.2 M" in result.stdout
