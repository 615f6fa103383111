"""Commands of the two training stages and the model registry: pretrain, finetune, models, model."""

from __future__ import annotations

import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from rigcli.cli.common import (
    DEVICE_HELP,
    Detector,
    Preset,
    SafeInterrupts,
    app,
    err,
    handles_errors,
    model_app,
    models_app,
    out,
    progress_bar,
    store_of,
    use_device,
)
from rigcli.diffusion.checkpoints import model_info
from rigcli.diffusion.registry import export_diffusionrig, import_diffusionrig, register_model
from rigcli.diffusion.unet import PRESETS
from rigcli.store import registered_models
from rigcli.train.shards import MAX_LANDMARK_ERROR
from rigcli.train.stages import finetune, pretrain


class Precision(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Rate:
    """Items per second of each progress task since its first update (shown beside the bar's ETA)."""

    def __init__(self) -> None:
        self.first: dict = {}

    def __call__(self, task, done: int, unit: str = "photos") -> str:
        start = self.first.setdefault(task, (done, time.monotonic()))
        seconds = time.monotonic() - start[1]
        return f"{(done - start[0]) / seconds:.1f} {unit}/s" if seconds > 1 and done > start[0] else ""


@app.command("finetune")
@handles_errors
def finetune_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person to personalize a model for.")],
    base: Annotated[
        str | None,
        typer.Option(help="Registered base model to start from (see `rig models list`).", show_default=False),
    ] = None,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Train encoder and UNet on the album alone (lower quality).")
    ] = False,
    preset: Annotated[
        Preset | None, typer.Option(help="Model size when training from scratch (default tiny).", show_default=False)
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Training steps (default 5000, the paper's).", show_default=False)
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help="Batch size (default 4, the paper's).", show_default=False)
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate (default 1e-5 from a base model, 1e-4 from scratch).", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed repeats a run exactly on one device.")] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 250,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard an interrupted run instead of resuming it.")
    ] = False,
    holdout: Annotated[
        int,
        typer.Option(
            min=0,
            help="Set this many photos aside (drawn with --seed), train without them and record their ids in "
            "model.json for `rig eval --holdout`.",
        ),
    ] = 0,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment",
            help="Also train on copies of each photo made by the physical edit (other lights, small expression "
            "changes and head turns, with their buffers) and on mirrored samples. Off by default: measured, it "
            "worsens identity at --strength 1 (benchmarks/RESULTS.md).",
            show_default=False,
        ),
    ] = None,
    augment_copies: Annotated[int, typer.Option(min=1, max=64, help="Augmented copies per photo.")] = 4,
    augment_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of samples drawn from the augmented copies.")
    ] = 0.5,
    pairs: Annotated[
        bool,
        typer.Option(
            "--pairs/--no-pairs",
            help="Train a model that refines the physical edit: it also sees the edit, and learns from the album's "
            "own pairs (photo A physically edited toward photo B's pose, expression and light, made into the real "
            "B). Pairs whose heads turn more than 20 degrees apart are left out. Off by default: measured on two "
            "held-out photos, a tiny model from scratch on two photos did no better than the plain one "
            "(benchmarks/RESULTS.md).",
        ),
    ] = False,
) -> None:
    """Stage 2: fine-tune a diffusion model on one person's photos (resumes an interrupted run)."""

    device = use_device(device)
    with progress_bar() as progress, SafeInterrupts() as interrupts:
        task = progress.add_task("fine-tuning", total=steps or 5000)
        first: list[tuple[int, float]] = []

        def stepped(step: int, loss: float) -> None:
            interrupts.check()  # between steps
            if not first:
                first.append((step, time.monotonic()))
            rate = (step - first[0][0]) / max(time.monotonic() - first[0][1], 1e-9)
            progress.update(task, completed=step, description=f"fine-tuning  loss {loss:.4f}  {rate:.2f} steps/s")

        try:
            info = finetune(
                store_of(ctx),
                name,
                base=base,
                from_scratch=from_scratch,
                preset_name=preset.value if preset else None,
                steps=steps,
                batch=batch,
                lr=lr,
                seed=seed,
                device=device,
                restart=restart,
                checkpoint_every=checkpoint_every,
                holdout=holdout,
                augment=augment,
                augment_copies=augment_copies,
                augment_ratio=augment_ratio,
                pairs=pairs,
                on_step=stepped,
                on_copy=lambda done, total: progress.update(
                    task, description=f"{'pairing' if pairs else 'augmenting'}  {done}/{total}", completed=0
                ),
            )
        except KeyboardInterrupt:
            progress.stop()
            err().print(
                f"interrupted: run the same command to resume from the last checkpoint (every {checkpoint_every} steps)"
            )
            raise typer.Exit(130) from None
    origin = f"base {info['base']}" if info["base"] else "from scratch"
    out().print(f"{escape(name)}: {info['steps']} steps ({origin}), final loss {info['final_loss']:.4f}")
    copies = info["augmented_copies_per_photo"]
    extra = f" + {copies} augmented copies each, and mirrored samples" if copies else " (no augmentation)"
    if pairs:
        extra = f", as {info['pairs']} pairs of two photos and each with itself"
    out().print(f"trained on {info['photos']} album photo(s){extra}")
    if info["holdout"]:
        out().print(f"held out for `rig eval`: {', '.join(info['holdout'])}")
    if info["from_scratch"]:
        out().print("trained from scratch on one album: expect lower quality than from a stage-1 base model")


@app.command("pretrain")
@handles_errors
def pretrain_command(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Option(
            help="Folder of face photos, many people, searched recursively (FFHQ as it comes: "
            "images1024x1024/00000/00000.png ... or its 256 px thumbnails); or a finished preparation "
            "(an earlier OUT/data) to train on as it is."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for the prepared shards, checkpoints and the model; on several nodes, a shared one."
        ),
    ],
    preset: Annotated[Preset, typer.Option(help="Model size.")] = Preset.tiny,
    steps: Annotated[int, typer.Option(min=1, help="Training steps (the paper: 50,000).")] = 50_000,
    batch: Annotated[int, typer.Option(min=1, help="Batch per process (the paper: 32 per GPU).")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate (the paper: 1e-4).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Random seed (weights, data order, noise).")] = 0,
    device: Annotated[
        str, typer.Option(help=DEVICE_HELP + " Under torchrun each process takes its LOCAL_RANK GPU.")
    ] = "auto",
    detector: Annotated[Detector, typer.Option(help="Face detector for preparing the photos.")] = Detector.hog,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 1000,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes preparing photos, per torchrun process (default: this machine's cores divided "
            "by the processes on it).",
        ),
    ] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Photos per prepared shard.")] = 1000,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Prepare only the first N photos (sorted by path), for a trial run.")
    ] = None,
    max_landmark_error: Annotated[
        float,
        typer.Option(help="Leave out photos whose fitted landmarks miss by more than this share of the eye distance."),
    ] = MAX_LANDMARK_ERROR,
    precision: Annotated[
        Precision, typer.Option(help="Autocast on GPUs (bf16 needs an Ampere or newer GPU); ignored on the CPU.")
    ] = Precision.bf16,
    prepare_only: Annotated[
        bool, typer.Option("--prepare-only", help="Prepare the shards and stop (for example on CPU nodes).")
    ] = False,
) -> None:
    """Stage 1: train a generic model on many people's photos (resumable; scales out with torchrun).

    The photos are prepared into shards under OUT/data first, in parallel (a rerun prepares only new ones).

    One node: torchrun --nproc-per-node 8 -m rigcli pretrain --data DIR --out OUT ...

    Several: add --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT (README, "Stage 1 at scale").

    Register the result with: rig models add NAME OUT/model
    """

    rank = int(os.environ.get("RANK", "0"))
    if workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = max(1, (os.cpu_count() or 1) // local)
    device = use_device(device)
    with progress_bar() as progress:
        prep = progress.add_task("preparing photos", total=None, visible=rank == 0)
        task = progress.add_task("pre-training", total=steps, visible=False)
        rates = Rate()

        def prepared(done: int, total: int) -> None:
            if rank == 0:
                progress.update(prep, completed=done, total=total, description=f"preparing photos {rates(prep, done)}")

        def stepped(step: int, loss: float) -> None:
            if rank == 0:
                described = f"pre-training {rates(task, step, 'steps')}  loss {loss:.4f}"
                progress.update(task, completed=step, visible=True, description=described)

        info = pretrain(
            store_of(ctx), data, out_dir, preset_name=preset.value, steps=steps, batch=batch, lr=lr, seed=seed,
            device=device, detector=detector.value, checkpoint_every=checkpoint_every, workers=workers,
            shard_size=shard_size, limit=limit, max_landmark_error=max_landmark_error, precision=precision.value,
            prepare_only=prepare_only, on_prepare=prepared, on_step=stepped,
        )  # fmt: skip
    if rank != 0:
        return
    counts = info["counts"] if prepare_only else info["photos"]
    used = counts.get("used", 0)
    skipped = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if k != "used") or "none"
    shards = info["shards"]
    per_photo = info["bytes_per_photo"]
    if prepare_only:
        out().print(f"prepared {used} photos (skipped: {skipped}) in {shards} shard(s), {per_photo:,} bytes a photo")
        where = escape(info["prepared"])
        out().print(f"shards in {where}; train on them with: rig pretrain --data {where} --out ...")
        return
    out().print(f"pre-trained on {used} photos (skipped: {skipped}) with {info['processes']} process(es)")
    out().print(f"data: {shards} shard(s), {per_photo:,} bytes on disk a photo")
    where = escape(str(out_dir / "model"))
    out().print(f"model in {where}; register it with: rig models add NAME {where}")


@models_app.command("list")
@handles_errors
def models_list(ctx: typer.Context) -> None:
    """List the registered base models."""

    models = registered_models(store_of(ctx))
    if not models:
        out().print("no base models registered; add one with: rig models add NAME PATH")
        return
    table = Table()
    for column in ("name", "image size", "base channels", "face model", "steps", "saved"):
        table.add_column(column)
    for name, info in models.items():
        cfg = info["config"]
        table.add_row(
            escape(name), str(cfg["image_size"]), str(cfg["base_channels"]), str(info.get("face_model_id")),
            str(info.get("steps", "")), str(info.get("saved", "")),
        )  # fmt: skip
    out().print(table)


@models_app.command("add")
@handles_errors
def models_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name to register the model under.")],
    path: Annotated[Path, typer.Argument(help="Folder holding model.safetensors and model.json.")],
) -> None:
    """Register a trained model (for example a pretrain output) as a base for `rig finetune --base`."""

    info = register_model(store_of(ctx), name, path)
    out().print(f"registered {escape(name)} (face model {info.get('face_model_id')})")


@models_app.command("import-diffusionrig")
@handles_errors
def models_import_diffusionrig(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The paper's checkpoint (.pt), e.g. its released stage-1 model.")],
    name: Annotated[
        str, typer.Option(help="Name to register it under (then: rig finetune PERSON --base NAME).", show_default=False)
    ],
    preset: Annotated[
        Preset, typer.Option(help="Configuration it was trained with (the paper's released model: paper).")
    ] = Preset.paper,
    force: Annotated[bool, typer.Option("--force", help="Replace a registered model of the same name.")] = False,
) -> None:
    """Register a checkpoint of the paper's code (DiffusionRig) as a FLAME base model.

    The file is read without running any code in it (weights only) and must hold exactly the
    preset's tensors; a mismatch names the missing, unexpected and wrongly shaped ones. Its buffers
    are FLAME's as DECA renders them: fine-tune it on people fitted with FLAME (see "Using FLAME").
    """

    with err().status(f"reading and checking {escape(str(path))}"):
        info = import_diffusionrig(store_of(ctx), path, name, preset_name=preset.value, force=force)
    out().print(
        f"registered {escape(name)} (preset {info['preset']}, face model {info['face_model_id']}, "
        f"sha256 {info['source_sha256'][:16]})"
    )


@models_app.command("export-diffusionrig")
@handles_errors
def models_export_diffusionrig(
    ctx: typer.Context,
    out_path: Annotated[
        Path, typer.Argument(help="File to write (.pt): a plain state dict, as the paper's code saves.")
    ],
    model: Annotated[
        str | None, typer.Option(help="Export this registered base model (see `rig models list`).", show_default=False)
    ] = None,
    person: Annotated[
        str | None, typer.Option(help="Export this person's fine-tuned model.", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT_PATH if it exists.")] = False,
) -> None:
    """Write a model in the paper's checkpoint layout, to run it in the paper's code (scripts/inference.py)."""

    with err().status(f"writing {escape(str(out_path))}"):
        info = export_diffusionrig(store_of(ctx), out_path, model_name=model, person=person, force=force)
    out().print(f"wrote {escape(info['path'])} ({info['tensors']} tensors)")
    out().print("build the paper's network with: " + " ".join(info["arguments"]), soft_wrap=True)
    if not info["flame_buffers"]:
        err().print(
            f"[yellow]note[/]: trained on buffers of {escape(str(info['face_model_id']))}; the paper's code feeds "
            "FLAME buffers rendered by DECA, so its results will not match this model's"
        )


@model_app.command("info")
@handles_errors
def model_info_command(
    preset: Annotated[Preset, typer.Option(help="Which configuration.")] = Preset.paper,
    batch: Annotated[int, typer.Option(min=1, help="Batch size for the memory figures.")] = 1,
) -> None:
    """Parameters, FLOPs of one UNet call (counted) and training memory at a batch size."""

    info = model_info(PRESETS[preset.value], batch)
    cfg = PRESETS[preset.value]
    table = Table(title=f"preset {preset.value}: {cfg.image_size}x{cfg.image_size}, base {cfg.base_channels}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("UNet parameters", f"{info['unet_parameters'] / 1e6:.1f} M")
    table.add_row("encoder parameters (ResNet-18)", f"{info['encoder_parameters'] / 1e6:.1f} M")
    table.add_row("GFLOPs per UNet call (per image)", f"{info['unet_gflops_per_call']:.1f}")
    table.add_row("weights, fp32", f"{info['weights_mb']:.0f} MB")
    table.add_row(f"training state (UNet grads + Adam), batch {batch}", f"{info['training_state_mb']:.0f} MB")
    table.add_row(f"activations saved for backward, batch {batch}, fp32", f"{info['activations_mb']:.0f} MB")
    out().print(table)
