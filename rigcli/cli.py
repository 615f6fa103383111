"""The ``rig`` command line: a thin table of contents over the Python API.

Every command turns a RigError into one red line on stderr and exit code 2; Ctrl-C exits 130 after
saying what was kept. Progress goes to stderr, results (tables, JSON) to stdout.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from rigcli import RigError, __version__
from rigcli.store import LockHolder, Store

app = typer.Typer(
    name="rig",
    help="Learn a person's face from ~20 photos, then edit new photos of them (DiffusionRig).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
people_app = typer.Typer(help="List, inspect and remove the people in the store.", no_args_is_help=True)
models_app = typer.Typer(help="Base models (stage 1) registered in the store.", no_args_is_help=True)
model_app = typer.Typer(help="The DiffusionRig network: sizes and costs of its presets.", no_args_is_help=True)
assets_app = typer.Typer(help="Model files and data rig needs besides its code.", no_args_is_help=True)
app.add_typer(people_app, name="people")
app.add_typer(assets_app, name="assets")
app.add_typer(models_app, name="models")
app.add_typer(model_app, name="model")

STATUS_STYLE = {
    "added": "green",
    "duplicate": "cyan",
    "outlier": "yellow",
    "no face": "red",
    "too small": "red",
    "unreadable": "red",
    "ok": "green",
}


def out() -> Console:
    """Standard output. Piped or redirected (no terminal, no COLUMNS), tables get 160 columns rather
    than Rich's 80, so that `rig bench > results.txt` keeps every column readable."""
    import os

    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(soft_wrap=False, width=160 if piped else None)


def err() -> Console:
    return Console(stderr=True, soft_wrap=True)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show RigError as one line (exit 2) and Ctrl-C as 'interrupted' (exit 130), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RigError as exc:
            err().print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err().print("[bold red]interrupted[/]: nothing half-written was left in the store")
            raise typer.Exit(130) from None

    return wrapper


class SafeInterrupts:
    """Ctrl-C is noted and acted on at the next safe point (``check``, between photos or steps), so it
    never lands inside a library halfway through a file; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.pending = False
        self.previous = None

    def __enter__(self) -> SafeInterrupts:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def store_of(ctx: typer.Context) -> Store:
    return ctx.find_root().obj


def _say_waiting(holder: LockHolder | None) -> None:
    who = holder.describe() if holder else "another rig process"
    err().print(f"[yellow]waiting[/]: this person is locked by {escape(who)}")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err(),
        transient=True,
    )


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar="RIG_HOME",
            help="Store root folder (people, models). Default: $RIG_HOME, else the platform's user data folder.",
            show_default=False,
        ),
    ] = None,
    version: Annotated[bool, typer.Option("--version", help="Print rig's version and exit.")] = False,
) -> None:
    """Learn a person's face from ~20 photos, then edit new photos of them (DiffusionRig)."""
    if version:
        print(f"rig {__version__}")
        raise typer.Exit()
    ctx.obj = Store(home)


class Detector(str, Enum):
    hog = "hog"
    cnn = "cnn"


def _add(store: Store, name: str, photos: list[Path], **options: Any):
    """Run enroll.add_photos under a progress bar; print the report table. Returns the report."""
    from rigcli.enroll import add_photos, collect_inputs
    from rigcli.store import check_name

    check_name(name)
    total = len(collect_inputs(photos))  # validates paths before any work
    done: list = []
    with _progress() as progress, SafeInterrupts() as interrupts:
        task = progress.add_task("adding", total=total)

        def started(index: int, path: Path) -> None:
            interrupts.check()  # between photos: every photo so far is fully stored
            progress.update(task, completed=index, description=f"{escape(path.name)[:40]:40s}")

        fit_task = None

        def fitting(step: int, steps: int) -> None:
            nonlocal fit_task
            interrupts.check()
            if fit_task is None:
                progress.update(task, completed=total)
                fit_task = progress.add_task("fitting the 3D face", total=steps)
            progress.update(fit_task, completed=step)

        try:
            report = add_photos(
                store,
                name,
                photos,
                on_start=started,
                on_outcome=done.append,
                on_wait=_say_waiting,
                on_fit=fitting,
                **options,
            )
        except KeyboardInterrupt:
            progress.stop()
            _outcome_table(name, done)
            raise
        progress.update(task, completed=total)
    _outcome_table(name, report.outcomes)
    manifest = report.manifest
    counts: dict[str, int] = {}
    for o in report.outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    training = sum(p.train for p in manifest.photos)
    out().print(f"{escape(name)}: {summary}. Album: {len(manifest.photos)} photos, {training} used for training.")
    if report.fit_note:
        out().print(escape(report.fit_note))
    if report.usable == 0:
        reasons = "; ".join(f"{o.source.name}: {o.detail}" for o in report.outcomes[:3])
        raise RigError(f"nothing usable was added to {name} ({reasons})")
    return report


def _outcome_table(name: str, outcomes: list) -> None:
    if not outcomes:
        return
    table = Table(title=f"add-person {escape(name)}", title_justify="left")
    table.add_column("photo", overflow="fold")
    table.add_column("id")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for o in outcomes:
        style = STATUS_STYLE.get(o.status, "")
        table.add_row(escape(o.source.name), o.photo_id or "", f"[{style}]{o.status}[/]", escape(o.detail))
    out().print(table)


_FACE_MODEL_OPTION = typer.Option(
    "--face-model",
    help="3D face model to fit: ict (ICT-FaceKit) or flame (the paper's; needs `rig assets import-flame`). "
    "Default: the person's current model, else ict.",
    show_default=False,
)
_ESTIMATOR_OPTION = typer.Option(
    "--estimator",
    help="How FLAME parameters are estimated: deca (DECA's encoder, as the paper; needs its weights imported) "
    "or landmarks (the landmark fitter). Default: deca when its weights are imported, else landmarks.",
    show_default=False,
)


@app.command("add-person")
@handles_errors
def add_person(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person's name: letters, digits, '-' and '_', at most 64.")],
    photos: Annotated[
        list[Path], typer.Argument(help="Photo files (JPEG, PNG, WebP, BMP, TIFF) and/or folders of them.")
    ],
    detector: Annotated[
        Detector, typer.Option(help="Face detector: hog (fast) or cnn (finds harder faces; ~10 s per photo on a CPU).")
    ] = Detector.hog,
    size: Annotated[
        int | None,
        typer.Option(
            help="Aligned crop size, 256 (the paper's) or 512; set when the person is created.", show_default=False
        ),
    ] = None,
    min_face: Annotated[int, typer.Option(help="Smallest face accepted, in photo pixels.")] = 48,
    keep_outliers: Annotated[
        bool | None,
        typer.Option(
            "--keep-outliers/--drop-outliers",
            help="Use photos that look like someone else for training anyway (default: keep the person's setting, "
            "initially drop).",
            show_default=False,
        ),
    ] = None,
    face_model: Annotated[str | None, _FACE_MODEL_OPTION] = None,
    estimator: Annotated[str | None, _ESTIMATOR_OPTION] = None,
) -> None:
    """Add a person, or more photos of them: detect, landmark, align and embed each photo, and store it."""
    store = store_of(ctx)
    _add(
        store, name, photos, detector=detector.value, size=size, min_face=min_face, keep_outliers=keep_outliers,
        face_model=face_model, estimator=estimator,
    )  # fmt: skip


@people_app.command("list")
@handles_errors
def people_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list instead of a table.")] = False,
) -> None:
    """List the people in the store."""
    store = store_of(ctx)
    rows = []
    for name in store.people():
        m = store.load(name)
        rows.append(
            {
                "name": name,
                "photos": len(m.photos),
                "train": sum(p.train for p in m.photos),
                "outliers": sum(p.status == "outlier" for p in m.photos),
                "created": m.created,
                "updated": m.updated,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        out().print(f"no people yet in {escape(str(store.root))}; add one with: rig add-person NAME PHOTOS...")
        return
    table = Table(title=f"people in {escape(str(store.root))}", title_justify="left")
    for column in ("name", "photos", "train", "outliers", "created", "updated"):
        table.add_column(column)
    for r in rows:
        table.add_row(*(escape(str(v)) for v in r.values()))
    out().print(table)


@people_app.command("show")
@handles_errors
def people_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person to show.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with every stored field.")] = False,
    sheet: Annotated[
        Path | None,
        typer.Option(
            help="Write a PNG with one row per photo: crop with landmarks and mesh outline, shaded, normal, albedo.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Show a person's photos: status, face box, fitted pose, and where the files are stored."""
    from rigcli.enroll import describe

    store = store_of(ctx)
    info = describe(store, name)
    if sheet is not None:
        from rigcli.photo import encode_png
        from rigcli.sheet import fit_sheet
        from rigcli.store import atomic_write_bytes

        atomic_write_bytes(sheet, encode_png(fit_sheet(store, name)))
        err().print(f"sheet written to {escape(str(sheet))}")
    if as_json:
        print(json.dumps(info, indent=2))
        return
    photos = info["photos"]
    training = sum(p["train"] for p in photos)
    console = out()
    console.print(f"[bold]{escape(info['name'])}[/]  created {info['created']}  updated {info['updated']}")
    console.print(f"folder {escape(info['folder'])}  crops {info['align_size']} px")
    console.print(f"{len(photos)} photos, {training} used for training")
    if info["face_fit"]:
        fitted = info["face_fit"]
        how = fitted.get("estimator") or "landmarks"
        console.print(f"3D fit: {fitted['face_model']} ({fitted['model_id']}, {how})")
    if info["model"]:
        m = info["model"]
        origin = f"base {m['base']}" if m["base"] else "from scratch"
        console.print(f"model: {m['steps']} steps ({origin}), final loss {m['final_loss']:.4f}, trained {m['trained']}")
    else:
        console.print("model: not fine-tuned yet (rig finetune)")
    table = Table()
    for column in ("id", "source", "status", "train", "face px", "yaw/pitch/roll", "top expression", "fit error"):
        table.add_column(column)
    for p in photos:
        x0, _, x1, _ = p["face_box"]
        style = STATUS_STYLE.get(p["status"], "")
        fit = p["fit"]
        if fit:
            pose = "/".join(f"{fit['pose_deg'][k]:+.0f}" for k in ("yaw", "pitch", "roll"))
            top = max(fit["expression"].items(), key=lambda kv: kv[1])
            expression = f"{top[0]} {top[1]:.2f}" if top[1] >= 0.1 else "neutral"
            error = f"{fit['landmark_error']:.3f}"
        else:
            pose = expression = error = "not fitted"
        table.add_row(
            p["id"],
            escape(p["source"]),
            f"[{style}]{p['status']}[/]",
            "yes" if p["train"] else "no",
            f"{x1 - x0:.0f}",
            pose,
            expression,
            error,
        )
    console.print(table)


@people_app.command("remove-photo")
@handles_errors
def people_remove_photo(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person.")],
    photo_id: Annotated[str, typer.Argument(help="The photo's id (or a unique prefix of 4+ characters).")],
) -> None:
    """Remove one photo (original, crop and face data) from a person."""
    from rigcli.enroll import remove_photo

    record = remove_photo(store_of(ctx), name, photo_id)
    out().print(f"removed photo {record.id} ({escape(record.source)}) from {escape(name)}")


@people_app.command("remove")
@handles_errors
def people_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person to delete, with all their photos and data.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a person and everything stored for them."""
    store = store_of(ctx)
    store.require(name)
    count = len(store.load(name).photos)
    if not yes:
        if not sys.stdin.isatty():
            raise RigError(f"removing {name} deletes {count} photos and all their data: pass --yes to confirm")
        typer.confirm(f"Delete {name} and {count} photos from {store.root}?", abort=True)
    with store.locked(name, on_wait=_say_waiting):
        store.remove_person(name)
    out().print(f"removed {escape(name)} ({count} photos)")


@app.command("refit")
@handles_errors
def refit_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person whose photos to fit again.")],
    face_model: Annotated[str | None, _FACE_MODEL_OPTION] = None,
    estimator: Annotated[str | None, _ESTIMATOR_OPTION] = None,
) -> None:
    """Fit the 3D face model to a person's photos again (after rig or the face model changed)."""
    from rigcli.enroll import refit

    with _progress() as progress:
        task = progress.add_task("fitting the 3D face", total=None)
        doc = refit(
            store_of(ctx),
            name,
            on_fit=lambda step, steps: progress.update(task, completed=step, total=steps),
            on_wait=_say_waiting,
            face_model=face_model,
            estimator=estimator,
        )
    worst = max(p["landmark_error"] for p in doc["photos"].values())
    out().print(
        f"fitted {doc['face_model']} to {len(doc['photos'])} photos of {escape(name)} "
        f"(worst landmark error {worst:.3f} of eye distance)"
    )


@assets_app.command("import-ict")
@handles_errors
def assets_import_ict(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="ICT-FaceKit: its folder, its FaceXModel folder, or the repository's zip.")
    ],
) -> None:
    """Import the ICT FaceKit face model (MIT) into the store, converted once into a compact cache."""
    from rigcli.facemodel import import_ict

    store = store_of(ctx)
    store.ensure_writable()
    with _progress() as progress:
        task = progress.add_task("reading ICT-FaceKit meshes", total=None)
        folder = import_ict(
            path, store, progress=lambda done, total: progress.update(task, completed=done, total=total)
        )
    out().print(f"ICT FaceKit imported into {escape(str(folder))}")


@assets_app.command("download-ict")
@handles_errors
def assets_download_ict(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(help="Where to fetch the ICT-FaceKit repository's zip.")] = "",
) -> None:
    """Download the public ICT-FaceKit repository (MIT, about 400 MB) and import its face model."""
    from rigcli.facemodel import ICT_REPOSITORY_ZIP, download_ict

    store = store_of(ctx)
    with _progress() as progress:
        task = progress.add_task("downloading ICT-FaceKit", total=None)

        def fetched(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)
            if total and done >= total:
                progress.update(task, description="importing")

        folder = download_ict(store, url or ICT_REPOSITORY_ZIP, progress=fetched)
    out().print(f"ICT FaceKit imported into {escape(str(folder))}")


@assets_app.command("import-flame")
@handles_errors
def assets_import_flame(
    ctx: typer.Context,
    flame: Annotated[
        Path | None,
        typer.Option(
            "--flame",
            help="FLAME 2020's generic_model.pkl (from flame.is.tue.mpg.de). Needed once; later imports may "
            "add the other files alone.",
        ),
    ] = None,
    deca: Annotated[
        Path | None,
        typer.Option("--deca", help="DECA's deca_model.tar: its encoder regresses FLAME parameters, as the paper did."),
    ] = None,
    texture: Annotated[
        Path | None,
        typer.Option(
            "--texture",
            help="Albedo space: FLAME_texture.npz (FLAME site) or FLAME_albedo_from_BFM.npz; the first 50 "
            "components are kept.",
        ),
    ] = None,
    landmarks: Annotated[
        Path | None,
        typer.Option("--landmarks", help="DECA's data/landmark_embedding.npy: the 68 landmarks on the FLAME mesh."),
    ] = None,
    template: Annotated[
        Path | None,
        typer.Option("--template", help="DECA's data/head_template.obj: the UV layout the albedo is sampled with."),
    ] = None,
) -> None:
    """Check your own FLAME/DECA files and convert them once into a safe cache in the store.

    Nothing is redistributed: register with FLAME and DECA and download the files yourself (README,
    "Using FLAME"). Pickles are read with a loader that rebuilds only arrays and refuses anything
    else; every file is checked before anything is written, and a failed import keeps the previous one.
    """
    from rigcli.flame import flame_folder, import_flame

    store = store_of(ctx)
    with _progress() as progress:
        task = progress.add_task("importing", total=None)

        def stepped(step: str, done: int, total: int | None) -> None:
            progress.update(task, description=step, completed=done, total=total)

        manifest = import_flame(
            store, flame=flame, deca=deca, texture=texture, landmarks=landmarks, template=template, progress=stepped
        )
    for role, record in manifest["assets"].items():
        out().print(f"{role}: {escape(record['source'])} (sha256 {record['source_sha256'][:12]}) -> {record['cache']}")
    out().print(f"FLAME assets in {escape(str(flame_folder(store)))}; `rig assets status` lists what each enables")


@assets_app.command("status")
@handles_errors
def assets_status(ctx: typer.Context) -> None:
    """Show which model files and libraries are installed, and where."""
    from rigcli.assets import asset_status

    table = Table(title="rig assets", title_justify="left")
    for column in ("asset", "status", "detail"):
        table.add_column(column, overflow="fold")
    lines = asset_status(store_of(ctx))
    for line in lines:
        table.add_row(escape(line.name), "[green]ok[/]" if line.ok else "[red]missing[/]", escape(line.detail))
    out().print(table)


class Preset(str, Enum):
    paper = "paper"
    small = "small"
    tiny = "tiny"


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
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, ...")] = "cpu",
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
) -> None:
    """Stage 2: fine-tune a diffusion model on one person's photos (resumes an interrupted run)."""
    from rigcli.train import finetune

    with _progress() as progress, SafeInterrupts() as interrupts:
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
                on_step=stepped,
            )
        except KeyboardInterrupt:
            progress.stop()
            err().print(
                f"interrupted: run the same command to resume from the last checkpoint (every {checkpoint_every} steps)"
            )
            raise typer.Exit(130) from None
    origin = f"base {info['base']}" if info["base"] else "from scratch"
    out().print(f"{escape(name)}: {info['steps']} steps ({origin}), final loss {info['final_loss']:.4f}")
    if info["holdout"]:
        out().print(f"held out for `rig eval`: {', '.join(info['holdout'])}")
    if info["from_scratch"]:
        out().print("trained from scratch on one album: expect lower quality than from a stage-1 base model")


@app.command("pretrain")
@handles_errors
def pretrain_command(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="Folder of face photos (searched recursively), many people.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the prepared data, checkpoints and the model.")],
    preset: Annotated[Preset, typer.Option(help="Model size.")] = Preset.tiny,
    steps: Annotated[int, typer.Option(min=1, help="Training steps (the paper: 50,000).")] = 50_000,
    batch: Annotated[int, typer.Option(min=1, help="Batch per process (the paper: 32 per GPU).")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate (the paper: 1e-4).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[
        str, typer.Option(help="cpu or cuda (under torchrun each process takes its LOCAL_RANK GPU).")
    ] = "cpu",
    detector: Annotated[Detector, typer.Option(help="Face detector for preparing the photos.")] = Detector.hog,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 1000,
) -> None:
    """Stage 1: train a generic model on many people's photos (resumable; scales out with torchrun).

    Multi-process: torchrun --nproc-per-node N -m rigcli pretrain --data DIR --out OUT ...
    Register the result with: rig models add NAME OUT/model
    """
    import os

    from rigcli.train import pretrain

    rank = int(os.environ.get("RANK", "0"))
    with _progress() as progress:
        prep = progress.add_task("preparing photos", total=None, visible=rank == 0)
        task = progress.add_task("pre-training", total=steps, visible=False)

        def stepped(step: int, loss: float) -> None:
            if rank == 0:
                progress.update(task, completed=step, visible=True, description=f"pre-training  loss {loss:.4f}")

        info = pretrain(
            store_of(ctx), data, out_dir, preset_name=preset.value, steps=steps, batch=batch, lr=lr, seed=seed,
            device=device, detector=detector.value, checkpoint_every=checkpoint_every,
            on_prepare=lambda done, total: progress.update(prep, completed=done, total=total), on_step=stepped,
        )  # fmt: skip
    if rank == 0:
        used = info["photos"].get("used", 0)
        skipped = ", ".join(f"{n} {k}" for k, n in sorted(info["photos"].items()) if k != "used") or "none"
        out().print(f"pre-trained on {used} photos (skipped: {skipped}) with {info['processes']} process(es)")
        where = escape(str(out_dir / "model"))
        out().print(f"model in {where}; register it with: rig models add NAME {where}")


@models_app.command("list")
@handles_errors
def models_list(ctx: typer.Context) -> None:
    """List the registered base models."""
    from rigcli.train import registered_models

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
    from rigcli.train import register_model

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
    from rigcli.train import import_diffusionrig

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
    from rigcli.train import export_diffusionrig

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
    from rigcli.train import model_info
    from rigcli.unet import PRESETS

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


class LightSide(str, Enum):
    left = "left"
    right = "right"
    top = "top"
    bottom = "bottom"
    front = "front"
    back = "back"


def _parse_blend(items: list[str]) -> dict[str, float]:
    blend = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            blend[name] = float(value)
        except ValueError:
            raise RigError(f"--blend {item!r}: write NAME=WEIGHT, e.g. --blend jawOpen=0.5") from None
        if not sep:
            raise RigError(f"--blend {item!r}: write NAME=WEIGHT, e.g. --blend jawOpen=0.5")
    return blend


def _parse_pair(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        yaw, pitch = (float(v) for v in text.split(","))
    except ValueError:
        raise RigError(f"--light-dir {text!r}: write YAW,PITCH in degrees, e.g. --light-dir -45,20") from None
    return yaw, pitch


@app.command("edit")
@handles_errors
def edit_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person in the photos (with a fine-tuned model).")],
    inputs: Annotated[list[Path], typer.Argument(help="Photos of that person to edit.")],
    light: Annotated[LightSide | None, typer.Option(help="Light from this side.", show_default=False)] = None,
    light_dir: Annotated[
        str | None,
        typer.Option(
            help="Light direction YAW,PITCH in degrees (yaw > 0: from the image's right).", show_default=False
        ),
    ] = None,
    light_intensity: Annotated[
        float | None,
        typer.Option(
            help="Directional light strength (default 0.8; given, the brightness is not kept).", show_default=False
        ),
    ] = None,
    ambient: Annotated[float | None, typer.Option(help="Ambient light (default 0.35).", show_default=False)] = None,
    light_from: Annotated[
        Path | None, typer.Option(help="Copy the lighting of another photo.", show_default=False)
    ] = None,
    smile: Annotated[float | None, typer.Option(help="Smile weight, 0 to 1.", show_default=False)] = None,
    jaw_open: Annotated[float | None, typer.Option(help="Open the jaw, 0 to 1.", show_default=False)] = None,
    blink: Annotated[float | None, typer.Option(help="Close the eyes, 0 to 1.", show_default=False)] = None,
    brow_raise: Annotated[float | None, typer.Option(help="Raise the brows, 0 to 1.", show_default=False)] = None,
    frown: Annotated[float | None, typer.Option(help="Frown, 0 to 1.", show_default=False)] = None,
    pucker: Annotated[float | None, typer.Option(help="Pucker the lips, 0 to 1.", show_default=False)] = None,
    blend: Annotated[
        list[str] | None,
        typer.Option(help="Set any of the 53 ARKit blendshapes: NAME=WEIGHT (repeatable).", show_default=False),
    ] = None,
    expression_from: Annotated[
        Path | None, typer.Option(help="Copy the expression of another photo.", show_default=False)
    ] = None,
    yaw: Annotated[float, typer.Option(help="Turn the head, degrees (> 0: nose to the image's right).")] = 0.0,
    pitch: Annotated[float, typer.Option(help="Tilt the head, degrees (> 0: face up).")] = 0.0,
    roll: Annotated[float, typer.Option(help="Roll the head, degrees (> 0: counter-clockwise).")] = 0.0,
    pose_from: Annotated[
        Path | None, typer.Option(help="Copy the head pose of another photo.", show_default=False)
    ] = None,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="DDIM steps (the paper: 20).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed for --no-invert noise.")] = 0,
    batch: Annotated[int, typer.Option(min=1, help="Photos per model batch.")] = 8,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, ...")] = "cpu",
    model: Annotated[
        Path | None, typer.Option(help="A model folder instead of the person's fine-tuned one.", show_default=False)
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="Runtime for the UNet: torch, onnx (ONNX Runtime) or trt (TensorRT, fp16), exported once and kept; "
            "options after dashes, e.g. torch-fp16-cl-graphs, onnx-fp16, trt-fp32 (see README, Engines)."
        ),
    ] = "torch",
    no_invert: Annotated[
        bool, typer.Option("--no-invert", help="Start from seeded noise instead of inverting the photo.")
    ] = False,
    paste_back: Annotated[
        bool, typer.Option("--paste-back", help="Compose the edit back into the full photo.")
    ] = False,
    sheet: Annotated[
        bool, typer.Option("--sheet", help="Also write input | original buffers | edited buffers | output.")
    ] = False,
    sweep: Annotated[
        str | None,
        typer.Option(help="Animate one control, e.g. smile=0:1:8 (GIF, one frame per value).", show_default=False),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output file (one input only).", show_default=False)
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for the outputs of several inputs.")] = Path(
        "edits"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")] = False,
) -> None:
    """Edit photos of a person: lighting, expression and head pose, keeping who they are."""
    from rigcli.edit import Controls, Editor, edit_photos, parse_sweep, sheet_row, sweep_frames
    from rigcli.edit import paste_back as compose
    from rigcli.photo import encode_png
    from rigcli.sheet import grid
    from rigcli.store import atomic_write_bytes

    expression = {
        k: v
        for k, v in dict(
            smile=smile, jaw_open=jaw_open, blink=blink, brow_raise=brow_raise, frown=frown, pucker=pucker
        ).items()
        if v is not None
    }
    controls = Controls(
        light=light.value if light else None, light_dir=_parse_pair(light_dir), light_intensity=light_intensity,
        ambient=ambient, light_from=light_from, expression=expression, blend=_parse_blend(blend or []),
        expression_from=expression_from, yaw=yaw, pitch=pitch, roll=roll, pose_from=pose_from,
    )  # fmt: skip
    if output is not None and len(inputs) != 1:
        raise RigError("-o names one output file: with several inputs use --out-dir")
    targets = {p: output or out_dir / f"{p.stem}-edited.png" for p in inputs}
    extra = [t.with_name(t.stem + "-sheet.png") for t in targets.values()] if sheet else []
    extra += [t.with_suffix(".gif") for t in targets.values()] if sweep else []
    existing = [str(t) for t in [*targets.values(), *extra] if t.exists()]
    if existing and not force:
        raise RigError(f"output exists (pass --force to overwrite): {', '.join(existing[:3])}")
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise RigError(f"no such photo: {', '.join(missing)}")
    from engines import EngineSpec

    exported = EngineSpec.parse(engine).kind in ("onnx", "trt")  # exported or built on first use: minutes
    with err().status(f"preparing the {engine} engine (made once, then reused)") if exported else nullcontext():
        editor = Editor(store_of(ctx), name, model_dir=model, device=device, engine=engine)
    controls.validate(editor.control_names)
    sweep_spec = parse_sweep(sweep, editor.control_names) if sweep else None
    with _progress() as progress:
        task = progress.add_task("reading", total=len(inputs))

        def moved(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        results = edit_photos(
            editor, inputs, controls, steps=steps, invert=not no_invert, seed=seed, batch=batch, on_progress=moved
        )
        for result in results:
            if result.output is None:
                continue
            target = targets[result.source]
            picture = result.output
            if paste_back:
                mask = editor.face_masks(result.fit)[0]
                picture = compose(result.prepared.pixels, result.output, result.prepared.crop_to_photo, mask)
            atomic_write_bytes(target, encode_png(picture))
            if sheet:
                atomic_write_bytes(
                    target.with_name(target.stem + "-sheet.png"), encode_png(grid(sheet_row(result, editor.size), 6))
                )
            if sweep_spec:
                import imageio.v3 as iio

                progress.update(task, description=f"sweep {sweep_spec[0]}")
                frames = sweep_frames(
                    editor, result, controls, *sweep_spec, steps=steps, seed=seed, invert=not no_invert
                )
                atomic_write_bytes(
                    target.with_suffix(".gif"),
                    iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=150, loop=0),
                )
    table = Table(title=f"edit {escape(name)}", title_justify="left")
    for column in ("photo", "status", "output / reason"):
        table.add_column(column, overflow="fold")
    for result in results:
        ok = result.output is not None
        detail = str(targets[result.source]) if ok else result.error
        table.add_row(escape(result.source.name), "[green]edited[/]" if ok else "[red]failed[/]", escape(detail))
    out().print(table)
    if not any(r.output is not None for r in results):
        raise RigError("no photo could be edited")


DEMO_EDITS = {  # output name -> controls
    "light-left": {"light": "left"},
    "light-right": {"light": "right"},
    "smile": {"expression": {"smile": 0.9}},
    "yaw": {"yaw": 15.0},
}


@app.command("eval")
@handles_errors
def eval_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person to evaluate a model of.")],
    holdout: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Evaluate on K of the photos `rig finetune --holdout` set aside (default: all it recorded).",
            show_default=False,
        ),
    ] = None,
    photos: Annotated[
        list[Path] | None,
        typer.Option(
            "--photos",
            help="New photos of the person instead: files or folders (repeat the option).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="The model: `person` (the person's fine-tuned model), a registered base model, or a model folder."
        ),
    ] = "person",
    compare: Annotated[
        str | None,
        typer.Option(
            help="A second model on the same photos and seed, side by side, written MODEL:STEPS@ENGINE where any "
            "part left out is the first's: `generic` (a base model), `:10` (10 DDIM steps), `@onnx`, `person:10@onnx`.",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="DDIM steps (the paper: 20).")] = 20,
    engine: Annotated[
        str,
        typer.Option(
            help="Runtime for the UNet, as for `rig edit`: torch, onnx or trt, with options after dashes, e.g. "
            "torch-fp16, onnx-fp16, trt-fp32 (see README, Engines)."
        ),
    ] = "torch",
    seed: Annotated[
        int, typer.Option(help="Seed, recorded in metrics.json (inversion and sampling are deterministic).")
    ] = 0,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, ...")] = "cpu",
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for metrics.json and report.html (default: eval-NAME).", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an earlier metrics.json and report.html.")] = False,
) -> None:
    """Measure identity, fidelity and edit accuracy on photos the model did not train on.

    Per photo a fixed suite: reconstruction (no edit), light from left, right, top and bottom, smile
    0.8, jaw open 0.6, blink 1.0, yaw +15 and -15 degrees, and a transfer of light, expression and pose
    from each other photo. Writes metrics.json (every edit, and means per edit type, rounded to 4
    decimals) and report.html (self-contained: the same summary and one image grid per edit type).
    """
    from rigcli.evaluate import (
        METRICS,
        ModelSpec,
        eval_photos,
        evaluate,
        format_value,
        output_paths,
        parse_spec,
        write_outputs,
    )

    store = store_of(ctx)
    target = out_dir or Path(f"eval-{name}")
    existing = [str(p) for p in output_paths(target) if p.exists()]
    if existing and not force:
        raise RigError(f"output exists (pass --force to overwrite): {', '.join(existing)}")
    chosen = eval_photos(store, name, holdout, photos)
    first = ModelSpec(model, steps, engine)
    specs = [first] if compare is None else [first, parse_spec(compare, first)]
    with _progress() as progress:
        task = progress.add_task("reading", total=None)
        evaluation = evaluate(
            store, name, chosen, specs, seed=seed, device=device,
            on_progress=lambda label, done, total: progress.update(
                task, description=escape(label)[:48], completed=done, total=total
            ),
        )  # fmt: skip
    metrics_path, report_path, doc = write_outputs(evaluation, target)
    table = Table(title=f"eval {escape(name)}: {len(chosen)} photo(s), seed {seed}", title_justify="left")
    # the row labels stay whole; the numeric columns wrap their headers when the terminal is narrow
    table.add_column("model", min_width=max(len(m["label"]) for m in doc["models"]), no_wrap=True)
    table.add_column("edit type", min_width=len("reconstruction"), no_wrap=True)
    table.add_column("n", justify="right")
    for _, title in METRICS:
        table.add_column(title, justify="right")
    for entry in doc["models"]:
        for kind, row in entry["summary"].items():
            table.add_row(escape(entry["label"]), kind, str(row["count"]), *(format_value(row[k]) for k, _ in METRICS))
    out().print(table)
    out().print(f"metrics: {escape(str(metrics_path))}\nreport:  {escape(str(report_path))}")


def _model_folder(store: Store, name: str, model: Path | None) -> Path:
    """The model folder to export: ``--model``, else the person's fine-tuned one (which must exist)."""
    store.require(name)
    folder = model or store.person_dir(name) / "model"
    if not (folder / "model.json").is_file():
        raise RigError(f"{name} has no fine-tuned model: run `rig finetune {name}` first (or pass --model DIR)")
    return folder


@app.command("export-onnx")
@handles_errors
def export_onnx_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person whose fine-tuned UNet to export.")],
    fp16: Annotated[
        bool,
        typer.Option(
            "--fp16",
            help="Half precision, for GPU execution providers. On a CPU it runs, no faster than fp32, and the "
            "export itself is slow there (torch's fp16 CPU convolutions: 27 min for the paper UNet on 2 cores).",
        ),
    ] = False,
    opset: Annotated[int, typer.Option(min=13, help="ONNX opset.")] = 17,
    max_batch: Annotated[int, typer.Option(min=1, help="Largest batch the engine is meant for.")] = 32,
    model: Annotated[
        Path | None, typer.Option(help="A model folder instead of the person's.", show_default=False)
    ] = None,
) -> None:
    """Export the conditioned UNet step (global latent as an input, dynamic batch) to ONNX."""
    from engines.onnx import artifact, require_onnx, trace_device
    from rigcli.train import load_model

    require_onnx()
    store = store_of(ctx)
    folder = _model_folder(store, name, model)
    net, _ = load_model(folder)
    where = "on the GPU" if trace_device(fp16) == "cuda" else "on the CPU"
    with (
        store.locked(name, on_wait=_say_waiting),
        err().status(f"exporting to ONNX ({'fp16' if fp16 else 'fp32'}, {where})"),
    ):
        path = artifact(
            net.denoisingUNet, store.person_dir(name) / "engines", net.cfg.image_size, fp16, opset, max_batch,
            source=str(folder.resolve()),
        )  # fmt: skip
    out().print(f"ONNX engine: {escape(str(path))}")


# ---------------------------------------------------------------- engines: TensorRT, listing, benchmark

engines_app = typer.Typer(help="Exported UNet engines (ONNX, TensorRT) kept in the store.", no_args_is_help=True)
app.add_typer(engines_app, name="engines")


@app.command("export-trt")
@handles_errors
def export_trt_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person whose fine-tuned UNet to build an engine for.")],
    fp16: Annotated[
        bool, typer.Option("--fp16/--fp32", help="Half precision (the default) or full fp32 kernels.")
    ] = True,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Largest batch of the optimization profile (batches 1..B; larger run in chunks).")
    ] = 32,
    model: Annotated[
        Path | None, typer.Option(help="A model folder instead of the person's.", show_default=False)
    ] = None,
) -> None:
    """Build a TensorRT engine of the conditioned UNet step (via ONNX) for this GPU; needs the gpu extra."""
    from engines.tensorrt import require_tensorrt, trt_artifact
    from rigcli.train import load_model

    require_tensorrt()
    store = store_of(ctx)
    folder = _model_folder(store, name, model)
    net, _ = load_model(folder)
    with store.locked(name, on_wait=_say_waiting), err().status("exporting to ONNX") as status:
        path = trt_artifact(
            net.denoisingUNet, store.person_dir(name) / "engines", net.cfg.image_size, fp16, max_batch,
            source=str(folder.resolve()), on_build=lambda message: status.update(f"{message} (minutes)"),
        )  # fmt: skip
    out().print(f"TensorRT engine: {escape(str(path))}")


@engines_app.command("list")
@handles_errors
def engines_list(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this person's engines.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Exported engines per person: kind, precision, key, size, and whether each is stale (its model,
    library versions or GPU changed since: it would be rebuilt on next use, never used as is)."""
    from engines import list_artifacts

    store = store_of(ctx)
    found = list_artifacts(store, [store.require(name)] if name else None)
    if as_json:
        rows = [
            {"person": a.person, "key": a.key, "kind": a.kind, "precision": a.precision, "bytes": a.size,
             "state": a.state, "reason": a.reason, "info": a.info}
            for a in found
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="engines", title_justify="left")
    for column in ("person / model", "kind", "precision", "key", "size", "state"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    style = {"current": "green", "stale": "red", "unknown": "yellow"}
    for a in found:
        source = a.info.get("source")
        who = (
            a.person
            if not source or Path(source) == (store.person_dir(a.person) / "model").resolve()
            else (f"{a.person} ({source})")
        )
        state = f"[{style[a.state]}]{a.state}[/]" + (f": {escape(a.reason)}" if a.reason else "")
        table.add_row(escape(who), a.kind, a.precision, a.key, f"{a.size / 2**20:.1f} MB", state)
    out().print(table if found else "no exported engines (rig export-onnx NAME, rig export-trt NAME)")


@engines_app.command("remove")
@handles_errors
def engines_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person whose engine to remove.")],
    key: Annotated[str | None, typer.Argument(help="The engine's key (see `rig engines list`).")] = None,
    remove_all: Annotated[bool, typer.Option("--all", help="Remove all of this person's engines.")] = False,
) -> None:
    """Remove exported engines (they are rebuilt when next needed)."""
    from engines import remove_artifacts

    store = store_of(ctx)
    with store.locked(store.require(name), on_wait=_say_waiting):
        removed = remove_artifacts(store, name, key, remove_all)
    out().print(f"removed {len(removed)} engine(s) of {escape(name)}: {', '.join(removed) or 'none'}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RigError(f"{option} {text!r}: write whole numbers separated by commas, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise RigError(f"{option} {text!r}: give at least one number, each 1 or more")
    return values


@app.command("bench")
@handles_errors
def bench_command(
    preset: Annotated[
        Preset, typer.Option(help="Model configuration (random weights: speed does not need training).")
    ] = (Preset.paper),
    model: Annotated[
        Path | None,
        typer.Option(
            help="A saved model folder (e.g. people/NAME/model in the store) instead of --preset: its own size "
            "and trained weights, so the accuracy columns describe that model. Inputs stay random.",
            show_default=False,
        ),
    ] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32",
    steps: Annotated[str, typer.Option(help="DDIM step counts, comma-separated.")] = "20,10",
    engines: Annotated[
        str,
        typer.Option(
            help="Engine specs, comma-separated: torch-fp32, torch-fp16, torch-bf16, with -cl (channels-last), "
            "-compile (torch.compile), -graphs (CUDA graphs); onnx, onnx-fp16; trt (fp16), trt-fp32."
        ),
    ] = "torch-fp32,torch-fp16,onnx,trt",
    device: Annotated[
        str | None, typer.Option(help="torch device (default: cuda when available, else cpu).", show_default=False)
    ] = None,
    no_invert: Annotated[
        bool, typer.Option("--no-invert", help="Edits without DDIM inversion (sampling calls only).")
    ] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Timed edits per run; the fastest counts.")] = 2,
    calls: Annotated[int, typer.Option(min=1, help="Timed UNet calls per engine and batch, after a warm-up.")] = 5,
    peak_tflops: Annotated[
        float | None,
        typer.Option(
            help="The GPU's peak in TFLOP/s for the fraction-of-peak column. Default: a table of dense (no "
            "sparsity) fp16/bf16 tensor-core peaks: H100 SXM 989, H100 PCIe 756, H200 989, A100 312, V100 125, "
            "L4 121, RTX 4090 165; n/a for CPUs and other GPUs.",
            show_default=False,
        ),
    ] = None,
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the full results as JSON.")] = Path(
        "rig-bench.json"
    ),
) -> None:
    """Time the paper's configuration (fp32, eager, 20 DDIM steps, batch 1, with inversion) and each
    engine x batch x steps in one run: ms per UNet call, edits/s, speed-up, peak memory, % of GPU peak,
    and each one's accuracy against fp32 (one UNet call's relative error, the whole edit's PSNR)."""
    import torch

    from engines.bench import BenchPlan, run_bench
    from rigcli.store import atomic_write_json

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RigError("--device cuda: torch sees no CUDA GPU (install torch's CUDA build, or use --device cpu)")
    from engines import EngineSpec

    specs = [e.strip() for e in engines.split(",") if e.strip()]
    for spec in specs:
        EngineSpec.parse(spec)  # refuse a typo before minutes of measuring
    if model is not None and not (model / "model.json").is_file():
        raise RigError(f"--model {model}: no model there (model.json missing)")
    plan = BenchPlan(
        preset=preset.value, batches=_int_list(batch, "--batch"), steps=_int_list(steps, "--steps"), engines=specs,
        device=device, invert=not no_invert, repeats=repeats, calls=calls, peak_tflops=peak_tflops, model_dir=model,
    )  # fmt: skip
    with _progress() as progress:
        task = progress.add_task("benchmark", total=1)

        def moved(label: str, done: int, total: int) -> None:
            progress.update(task, description=label, completed=done, total=total)

        report = run_bench(plan, on_progress=moved)
    atomic_write_json(json_path, report)
    base = report["baseline"]
    what = escape(report["preset"] or report["model"])
    table = Table(
        title=f"rig bench: {what} ({report['image_size']} px, {report['unet_gflops_per_call']:.1f} "
        f"GFLOPs/call) on {escape(report['device_name'])}",
        title_justify="left",
        caption="baseline: the paper's configuration (torch fp32 eager, 20 DDIM steps, batch 1"
        + (", with inversion)" if plan.invert else ")")
        + ". error / call: relative error of one UNet call against fp32; edit dB: PSNR of the whole edit against "
        "the fp32 edit of the same inputs",
    )
    columns = ("engine", "batch", "steps", "ms / UNet call", "edits/s", "speed-up", "peak MB", "% of peak",
               "error / call", "edit dB")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "engine" else "right")
    table.add_column("note", overflow="fold")
    said = set()
    for row in [base, *report["runs"]]:
        label = ("baseline " if row["baseline"] else "") + row["engine"]
        if row["status"] == "skipped":  # one line per engine that cannot run here, whatever the batch
            if row["engine"] not in said:
                said.add(row["engine"])
                table.add_row(label, "all", "all", *[""] * 7, f"[yellow]skipped[/]: {escape(row['reason'])}")
            continue
        if row["status"] != "ok":
            note = f"[red]{row['status']}[/]: {escape(row['reason'])}"
            table.add_row(label, str(row["batch"]), str(row["steps"]), *[""] * 7, note)
            continue
        fraction = row["fraction_of_peak"]
        table.add_row(
            label, str(row["batch"]), str(row["steps"]), f"{row['ms_per_unet_call']:.1f}",
            f"{row['edits_per_s']:.2f}", f"{row['speedup']:.2f}x" if row["speedup"] is not None else "n/a",
            f"{row['peak_memory_mb']:.0f}", f"{100 * fraction:.0f}%" if fraction is not None else "n/a",
            f"{row['call_error_vs_fp32']:.1e}",
            "ref" if row["edit_is_reference"] else f"{row['edit_psnr_vs_fp32']:.1f}", "",
        )  # fmt: skip
    out().print(table)
    out().print(f"results: {escape(str(json_path))}")


@app.command("demo")
@handles_errors
def demo(
    ctx: typer.Context,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the demo's album, store, sheets and edits.")
    ] = Path("rig-demo"),
    photos: Annotated[int, typer.Option(min=3, max=40, help="How many album photos to generate.")] = 12,
    steps: Annotated[
        int, typer.Option(min=1, help="Fine-tuning steps of the tiny model (about 4 minutes on 2 cores).")
    ] = 600,
    quick: Annotated[
        bool, typer.Option("--quick", help="A short run (6 photos, 40 steps) that only shows the pipeline works.")
    ] = False,
    ict: Annotated[
        Path | None,
        typer.Option(help="Import the ICT-FaceKit face model from this folder or zip first.", show_default=False),
    ] = None,
) -> None:
    """The whole pipeline on the public-domain astronaut photo: album, 3D fit, a tiny model, edits.

    Writes to OUT: album/, home/ (the store, unless --home is given), aligned.png, fit.png,
    edits/*.png and edits/sheet.png. Without a face model installed it downloads ICT-FaceKit
    (about 400 MB) unless --ict gives a copy.
    """
    from rigcli.demo import make_album
    from rigcli.edit import Controls, Editor, edit_photos, sheet_row
    from rigcli.facemodel import download_ict, import_ict, installed
    from rigcli.photo import encode_png
    from rigcli.sheet import aligned_sheet, fit_sheet, grid
    from rigcli.store import atomic_write_bytes
    from rigcli.train import finetune

    explicit_home = ctx.find_root().params.get("home") is not None
    store = store_of(ctx) if explicit_home else Store(out_dir / "home")
    store.ensure_writable()
    if ict is not None:
        err().print(f"importing ICT-FaceKit from {escape(str(ict))}")
        import_ict(ict, store)
    elif not installed(store):
        err().print("no face model installed: downloading ICT-FaceKit (MIT, about 400 MB); --ict PATH uses a copy")
        download_ict(store)
    if quick:
        photos, steps = min(photos, 6), min(steps, 40)
    err().print(f"making an album of {photos} photos in {escape(str(out_dir / 'album'))}")
    album = make_album(out_dir / "album", photos)
    _add(store, "astronaut", [a.path for a in album[1:]])  # photo 0 is kept out: it is the one we edit
    atomic_write_bytes(out_dir / "aligned.png", encode_png(aligned_sheet(store, "astronaut")))
    atomic_write_bytes(out_dir / "fit.png", encode_png(fit_sheet(store, "astronaut")))
    with _progress() as progress:
        task = progress.add_task("fine-tuning the tiny model from scratch", total=steps)

        def stepped(step: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"fine-tuning  loss {loss:.3f}")

        finetune(
            store, "astronaut", from_scratch=True, preset_name="tiny", steps=steps, batch=4, lr=3e-4,
            checkpoint_every=max(steps // 4, 1), restart=True, on_step=stepped,
        )  # fmt: skip
    editor = Editor(store, "astronaut")
    rows = []
    with _progress() as progress:
        task = progress.add_task("editing", total=len(DEMO_EDITS))
        for i, (label, fields) in enumerate(DEMO_EDITS.items()):
            (result,) = edit_photos(editor, [album[0].path], Controls(**fields), steps=20)
            atomic_write_bytes(out_dir / "edits" / f"{label}.png", encode_png(result.output))
            rows.extend(sheet_row(result, editor.size))
            progress.update(task, completed=i + 1)
    atomic_write_bytes(out_dir / "edits" / "sheet.png", encode_png(grid(rows, 6)))
    console = out()
    console.print(f"aligned crops: {escape(str(out_dir / 'aligned.png'))}; 3D fit: {escape(str(out_dir / 'fit.png'))}")
    console.print(
        f"edits ({', '.join(DEMO_EDITS)}) and a sheet (input | buffers before | after | output): "
        f"{escape(str(out_dir / 'edits'))}"
    )
    console.print(
        "This shows the pipeline, not the paper's quality: a 64-pixel model trained from scratch for "
        f"{steps} CPU steps on one album. For that quality use a GPU, the paper preset and a stage-1 "
        "base model: rig pretrain ... then rig finetune NAME --base MODEL (see the README)."
    )


def main() -> None:
    """Console-script entry point."""
    app(prog_name="rig")
