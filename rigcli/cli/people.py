"""Commands over the identity store: add-person, people, refit, assets."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from rigcli import RigError
from rigcli.assets.flame import import_flame
from rigcli.assets.ict import ICT_REPOSITORY_ZIP, download_ict, import_ict
from rigcli.assets.status import asset_status
from rigcli.cli.common import (
    ESTIMATOR_OPTION,
    FACE_MODEL_OPTION,
    STATUS_STYLE,
    Detector,
    SafeInterrupts,
    app,
    assets_app,
    err,
    handles_errors,
    out,
    people_app,
    progress_bar,
    say_waiting,
    store_of,
)
from rigcli.enroll import add_photos, collect_inputs, describe, fit_sheet, refit, remove_photo
from rigcli.face.flame import flame_folder
from rigcli.files import atomic_write_bytes
from rigcli.image.photo import encode_png
from rigcli.store import Store, check_name


def add_with_progress(store: Store, name: str, photos: list[Path], progress: Progress | None = None, **options: Any):
    """Run enroll.add_photos under a progress bar (``progress``'s, else its own); print the report
    table. Returns the report."""

    check_name(name)
    total = len(collect_inputs(photos))  # validates paths before any work
    done: list = []
    tasks = []
    with nullcontext(progress) if progress else progress_bar() as progress, SafeInterrupts() as interrupts:
        task = progress.add_task("adding", total=total)
        tasks.append(task)

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
                tasks.append(fit_task)
            progress.update(fit_task, completed=step)

        try:
            report = add_photos(
                store,
                name,
                photos,
                on_start=started,
                on_outcome=done.append,
                on_wait=say_waiting,
                on_fit=fitting,
                **options,
            )
        except KeyboardInterrupt:
            progress.stop()
            outcome_table(name, done)
            raise
        progress.update(task, completed=total)
        for done_task in tasks:  # a shared bar goes on with other work
            progress.remove_task(done_task)
    outcome_table(name, report.outcomes)
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


def outcome_table(name: str, outcomes: list) -> None:
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
    face_model: Annotated[str | None, FACE_MODEL_OPTION] = None,
    estimator: Annotated[str | None, ESTIMATOR_OPTION] = None,
) -> None:
    """Add a person, or more photos of them: detect, landmark, align and embed each photo, and store it."""
    store = store_of(ctx)
    add_with_progress(
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

    store = store_of(ctx)
    info = describe(store, name)
    if sheet is not None:
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
    with store.locked(name, on_wait=say_waiting):
        store.remove_person(name)
    out().print(f"removed {escape(name)} ({count} photos)")


@app.command("refit")
@handles_errors
def refit_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person whose photos to fit again.")],
    face_model: Annotated[str | None, FACE_MODEL_OPTION] = None,
    estimator: Annotated[str | None, ESTIMATOR_OPTION] = None,
) -> None:
    """Fit the 3D face model to a person's photos again (after rig or the face model changed)."""

    with progress_bar() as progress:
        task = progress.add_task("fitting the 3D face", total=None)
        doc = refit(
            store_of(ctx),
            name,
            on_fit=lambda step, steps: progress.update(task, completed=step, total=steps),
            on_wait=say_waiting,
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

    store = store_of(ctx)
    store.ensure_writable()
    with progress_bar() as progress:
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

    store = store_of(ctx)
    with progress_bar() as progress:
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

    store = store_of(ctx)
    with progress_bar() as progress:
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

    table = Table(title="rig assets", title_justify="left")
    for column in ("asset", "status", "detail"):
        table.add_column(column, overflow="fold")
    lines = asset_status(store_of(ctx))
    for line in lines:
        table.add_row(escape(line.name), "[green]ok[/]" if line.ok else "[red]missing[/]", escape(line.detail))
    out().print(table)
