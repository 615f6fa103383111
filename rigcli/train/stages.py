"""The paper's two stages as commands: pretrain (many people), finetune (one); base models in the store."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch

from engines.bench import BenchPlan, run_bench
from rigcli import RigError
from rigcli.diffusion.checkpoints import check_base_buffers, load_model, save_model
from rigcli.diffusion.unet import EDIT_CHANNELS, DiffusionRig, preset, widened
from rigcli.enroll import read_fit
from rigcli.face.registry import load_face_model
from rigcli.files import now_iso
from rigcli.store import registered_models, registry_dir
from rigcli.train.data import Augment, blob_data, person_data
from rigcli.train.loop import TrainConfig, train
from rigcli.train.shards import MAX_LANDMARK_ERROR, ShardData, is_prepared, prepare_shards, summarize


def holdout_photos(store, name: str, count: int, seed: int = 0) -> list[str]:
    """``count`` of a person's trainable, fitted photos set aside for ``rig eval``, drawn with ``seed``
    (the same album and seed give the same photos)."""

    if count <= 0:
        return []
    fit_doc = read_fit(store, name)
    fitted = fit_doc["photos"] if fit_doc else {}
    usable = sorted(r.id for r in store.load(name).photos if r.train and r.id in fitted)
    if count >= len(usable):
        raise RigError(
            f"--holdout {count} would leave no photo of {name} to train on ({len(usable)} usable): hold out fewer"
        )
    return sorted(random.Random(seed).sample(usable, count))


def finetune(
    store,
    name: str,
    *,
    base: str | None = None,
    from_scratch: bool = False,
    preset_name: str | None = None,
    steps: int | None = None,
    batch: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    restart: bool = False,
    checkpoint_every: int = 250,
    holdout: int = 0,
    augment: bool | Augment | None = None,
    augment_copies: int = 4,
    augment_ratio: float = 0.5,
    pairs: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_copy: Callable[[int, int], None] | None = None,
) -> dict:
    """Stage 2: personalize a base model on ``name``'s photos (or train from scratch); returns model.json.

    ``holdout`` photos are drawn with ``seed``, kept out of training and listed in model.json
    (``holdout``) for ``rig eval``. ``augment`` (off by default) adds ``augment_copies``
    physical-edit copies of each photo (``train.data.Augment``), drawn with chance ``augment_ratio``
    per sample, and mirrors half the samples. ``pairs`` (issue 27) trains a model that also takes the
    physical edit (``unet.widened``; a base model computes as before until it learns) on the album's
    pairs (``train.data.pair_edits``): A physically edited toward B's parameters, to be made into the
    real B; ``on_copy`` hears their making. Resumes an interrupted run with the same settings;
    ``restart`` discards it.
    """
    if not 0 <= augment_ratio <= 1:
        raise RigError(f"--augment-ratio {augment_ratio}: give a value between 0 and 1")
    if augment_copies < 1:
        raise RigError(f"--augment-copies {augment_copies}: give at least 1")

    store.require(name)
    torch.manual_seed(seed)  # the fresh model's initial weights are part of the run
    if base is None and not from_scratch:
        available = ", ".join(registered_models(store)) or "none registered"
        raise RigError(
            f"no base model given (registered: {available}): add one with `rig models add NAME PATH` and pass "
            "--base NAME, or pass --from-scratch to train on the album alone (lower quality)"
        )
    if base is not None:
        models = registered_models(store)
        if base not in models:
            raise RigError(f"no base model named {base!r} (registered: {', '.join(models) or 'none'})")
        model, base_info = load_model(registry_dir(store) / base)
        if preset_name is not None and preset(preset_name).to_json() != model.cfg.to_json():
            raise RigError(f"--preset {preset_name} does not match base model {base!r}'s configuration")
        cfg = TrainConfig(steps=steps or 5000, batch=batch or 4, lr=lr or 1e-5, seed=seed, freeze_encoder=True)
        if pairs:
            model = widened(model)
    else:
        model, base_info = DiffusionRig(preset(preset_name or "tiny", edit_channels=EDIT_CHANNELS if pairs else 0)), {}
        # from scratch there is no prior to preserve: stage 1's learning rate, encoder trained too
        cfg = TrainConfig(steps=steps or 5000, batch=batch or 4, lr=lr or 1e-4, seed=seed, freeze_encoder=False)
    cfg.checkpoint_every = checkpoint_every
    cfg.preview_every = max(checkpoint_every, cfg.steps // 10)
    # off unless asked: it worsens identity at strength 1 (issue 15, RESULTS.md); an Augment is used as given
    plan = augment if isinstance(augment, Augment) else Augment(copies=augment_copies, seed=seed) if augment else None
    if plan is not None:
        cfg.augment_ratio, cfg.flip = augment_ratio, True
    with store.locked(name):  # held for the whole run: one training per person at a time
        held_out = holdout_photos(store, name, holdout, seed)
        data = person_data(
            store, name, model.cfg.image_size, exclude=held_out, augment=plan, on_copy=on_copy, pairs=pairs
        )
        if base_info:
            check_base_buffers(base, base_info, name, data.face_model_id)
        run_dir = store.person_dir(name) / "training"
        if restart and run_dir.exists():
            shutil.rmtree(run_dir)
        meta = {"person": name, "base": base, "from_scratch": from_scratch, "config": model.cfg.to_json()}
        ema = train(model, data, cfg, run_dir, meta, device=device, on_step=on_step)
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        info = {
            "person": name,
            "base": base,
            "from_scratch": from_scratch,
            "steps": cfg.steps,
            "final_loss": log[-1]["loss"] if log else None,
            "face_model_id": data.face_model_id,
            "data_hash": data.data_hash,
            "holdout": held_out,
            "photos": data.photos,
            "augmented_copies_per_photo": data.copies,
            "pairs": data.cross,
            "train": asdict(cfg),
            "trained": now_iso(),
        }
        save_model(store.model_dir(name), ema, info)
    return info


def pretrain(
    store,
    data_dir: Path,
    out_dir: Path,
    *,
    preset_name: str = "tiny",
    steps: int = 50_000,
    batch: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
    device: str = "cpu",
    detector: str = "hog",
    checkpoint_every: int = 1000,
    workers: int | None = None,
    shard_size: int = 1000,
    limit: int | None = None,
    max_landmark_error: float = MAX_LANDMARK_ERROR,
    precision: str = "bf16",
    prepare_only: bool = False,
    on_prepare=None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Stage 1: a generic prior on a folder of face photos (or on a finished preparation, given as
    ``data_dir``). Under ``torchrun``, on one node or many, every process prepares its own shards
    (``train.shards``) on ``workers`` processes, then trains with DDP (NCCL on GPUs, gloo on CPUs) on
    its own part of every epoch, streamed from the shards. ``out_dir`` must be one folder that every
    node sees (a shared file system). Returns the summary (and model.json unless ``prepare_only``)."""

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = preset(preset_name)
    out_dir = Path(out_dir)
    try:
        barrier = lambda: None  # noqa: E731
        if dist.is_initialized():  # preparing can take hours: wait on a CPU group with a long timeout
            group = dist.new_group(backend="gloo", timeout=timedelta(hours=48))
            barrier = lambda: dist.barrier(group=group)  # noqa: E731
        prepared = Path(data_dir)
        if is_prepared(prepared):  # a finished preparation: train on it as it is
            summary = summarize(prepared)
        else:
            prepared = out_dir / "data"
            summary = prepare_shards(
                store, data_dir, prepared, cfg.image_size, detector=detector, workers=workers, shard_size=shard_size,
                limit=limit, max_landmark_error=max_landmark_error, rank=rank,
                world=dist.get_world_size() if dist.is_initialized() else 1, barrier=barrier, progress=on_prepare,
            )  # fmt: skip
        if prepare_only:
            return {"stage": 1, "prepared": str(prepared), **summary}
        data = ShardData(prepared, load_face_model(store), device)
        torch.manual_seed(seed)
        model = DiffusionRig(cfg)
        train_cfg = TrainConfig(
            steps=steps, batch=batch, lr=lr, seed=seed, freeze_encoder=False, checkpoint_every=checkpoint_every,
            preview_every=max(checkpoint_every, steps // 10), precision=precision,
        )  # fmt: skip
        meta = {"stage": 1, "data": str(data_dir), "config": cfg.to_json()}
        ema = train(model, data, train_cfg, out_dir / "training", meta, device=device, on_step=on_step)
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        digests = [digest]
        if dist.is_initialized():
            digests = [None] * dist.get_world_size()
            dist.all_gather_object(digests, digest)
        log = (
            [json.loads(x) for x in (out_dir / "training" / "log.jsonl").read_text().splitlines()] if rank == 0 else []
        )
        info = {
            "stage": 1,
            "steps": steps,
            "final_loss": log[-1]["loss"] if log else None,
            "face_model_id": data.face_model_id,
            "data_hash": data.data_hash,
            "photos": summary["counts"],
            "shards": summary["shards"],
            "bytes_per_photo": summary["bytes_per_photo"],
            "processes": len(digests),
            "replica_digests": digests,  # identical when the processes stayed in sync
            "train": asdict(train_cfg),
            "trained": now_iso(),
        }
        if rank == 0:
            save_model(out_dir / "model", ema, info)
        return info
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_on_blobs(
    preset_name: str,
    steps: int,
    device: str = "cpu",
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> DiffusionRig:
    """A preset's model trained from scratch for ``steps`` on synthetic blobs (``blob_data``) by the
    training loop itself, so ``rig bench`` measures each engine's accuracy on a trained model rather
    than random weights (whose outputs say nothing of a trained model's edits). Encoder and UNet train
    (nothing is pretrained), at lr 2e-4, batch 8; the EMA (decay 0.99) is returned. Nothing is kept."""
    torch.manual_seed(seed)
    cfg = preset(preset_name)
    model = DiffusionRig(cfg)
    data = blob_data(256, cfg.image_size, seed)
    settings = TrainConfig(
        steps=steps, batch=8, lr=2e-4, seed=seed, ema_decay=0.99, freeze_encoder=False,
        log_every=steps, checkpoint_every=steps, preview_every=steps,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rig-bench-train-") as run:
        return train(model, data, settings, Path(run), {"purpose": "rig bench"}, device, on_step).eval()


def bench(
    plan: BenchPlan,
    train_steps: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """``rig bench``: ``run_bench`` of ``plan``; with ``train_steps``, on the preset's model trained that
    long on synthetic blobs (``train_on_blobs``) and editing blobs it never saw, the report then holding
    the steps and the mean loss of their first and last tenth (did it learn)."""
    if not train_steps:
        return run_bench(plan, on_progress=on_progress)
    if plan.model_dir is not None:
        raise RigError("bench: a plan with a saved model (model_dir) is measured on it, not trained")
    losses: list[float] = []

    def stepped(step: int, loss: float) -> None:
        losses.append(loss)
        if on_step:
            on_step(step, loss)

    trained = train_on_blobs(plan.preset, train_steps, plan.device, on_step=stepped)
    held_out = blob_data(max(plan.batches), trained.cfg.image_size, seed=1)
    report = run_bench(
        plan, on_progress=on_progress, model=trained, inputs=(held_out.images, held_out.buffers),
        weights=f"trained {train_steps} steps on synthetic blobs",
    )  # fmt: skip
    tenth = max(1, len(losses) // 10)
    report["train_steps"] = train_steps
    report["train_loss"] = {"first": sum(losses[:tenth]) / tenth, "last": sum(losses[-tenth:]) / tenth}
    return report
