"""Commands that edit photos: edit, eval, demo."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from rigcli import RigError
from rigcli.cli.common import DEVICE_HELP, app, err, handles_errors, out, progress_bar, store_of, use_device
from rigcli.cli.people import add_with_progress
from rigcli.demo import DEMO_EDITS, run_demo
from rigcli.edit.controls import Controls
from rigcli.edit.editor import DEFAULT_STRENGTH
from rigcli.edit.outputs import edit_to_files
from rigcli.enroll import NOT_PERSON
from rigcli.evaluate.report import cross_cell, format_value, run_eval
from rigcli.evaluate.suite import METRICS
from rigcli.store import Store
from rigcli.studio.page import LOOPBACK, serve

PASTE_BACK_GONE = (
    "--paste-back is no longer needed and will be removed: the whole photo at its size is the default "
    "(--crop writes the aligned crop)"
)


class ComposeMode(str, Enum):
    refined = "refined"
    plain = "plain"


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


def _parse_strengths(text: str | None) -> list[float] | None:
    if text is None:
        return None
    hint = f"--strength {text!r}: write numbers between 0 and 1 separated by commas, e.g. 0,0.3,0.6,1"
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RigError(hint) from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise RigError(hint)
    return values


def _failure(reason: str | None, name: str) -> str:
    return f"not {name}" if reason == NOT_PERSON else "failed"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    model: Annotated[
        Path | None, typer.Option(help="A model folder instead of the person's fine-tuned one.", show_default=False)
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="Runtime for the UNet: torch, onnx (ONNX Runtime) or trt (TensorRT, fp16), exported once and kept; "
            "options after dashes, e.g. torch-bf16-cl-compile, torch-fp16-cl-graphs, onnx-fp16, trt-fp32 (see README, "
            "Engines). auto: on CUDA torch-bf16-cl-compile (compiled once, cached in the store; eager if compiling "
            "fails), on a CPU torch (fp32, eager)."
        ),
    ] = "auto",
    no_invert: Annotated[
        bool, typer.Option("--no-invert", help="Start from seeded noise instead of inverting the photo.")
    ] = False,
    strength: Annotated[
        float,
        typer.Option(
            help="How far the model refines the physical edit: 0 the physical edit alone (no model), 1 the paper's "
            "edit (the photo inverted all the way). The default was chosen by measurement (benchmarks/RESULTS.md).",
        ),
    ] = DEFAULT_STRENGTH,
    compose: Annotated[
        ComposeMode,
        typer.Option(help="refined: the strength method; plain: the model's crop upsampled and blended in."),
    ] = ComposeMode.refined,
    crop: Annotated[
        bool, typer.Option("--crop", help="Write the aligned crop at --crop-size instead of the whole photo.")
    ] = False,
    crop_size: Annotated[int, typer.Option(min=16, max=4096, help="Size of the --crop output.")] = 512,
    face: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Edit the N-th face from the left (default: the one nearest the person's album).",
            show_default=False,
        ),
    ] = None,
    paste_back: Annotated[bool, typer.Option("--paste-back", hidden=True)] = False,  # gone: see PASTE_BACK_GONE
    sheet: Annotated[
        bool,
        typer.Option(
            "--sheet",
            help="Also write a contact sheet: input | physical edit | output | displacement | shading ratio "
            "(aligned crops; with --compose plain: input | original buffers | edited buffers | output).",
        ),
    ] = False,
    sweep: Annotated[
        str | None,
        typer.Option(
            help="Animate one control, e.g. smile=0:1:8: a GIF, one frame per value, each made as the output is.",
            show_default=False,
        ),
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
    if paste_back:
        err().print(f"[yellow]warning[/]: {PASTE_BACK_GONE}")
    with progress_bar() as progress:
        task = progress.add_task("reading", total=len(inputs))

        def moved(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        written = edit_to_files(
            store_of(ctx), name, inputs, controls, output=output, out_dir=out_dir,
            compose=compose.value, strength=strength, crop=crop, crop_size=crop_size, face=face, sheet=sheet,
            sweep=sweep, force=force, steps=steps, invert=not no_invert, seed=seed, batch=batch,
            device=use_device(device), model=model, engine=engine, on_progress=moved,
        )  # fmt: skip
    table = Table(title=f"edit {escape(name)}", title_justify="left")
    for column in ("photo", "status", "output / reason", "identity dist.", "recon. dB"):
        table.add_column(column, overflow="fold")
    for item in written:
        ok, result = item.target is not None, item.result
        detail = str(item.target) if ok else result.error
        distance = "no face" if ok and item.identity_distance is None else _number(item.identity_distance, 3)
        status = "[green]edited[/]" if ok else f"[red]{escape(_failure(result.reason, name))}[/]"
        table.add_row(
            escape(result.source.name), status, escape(detail),
            distance, _number(result.reconstruction_psnr, 1),
        )  # fmt: skip
    out().print(table)
    for item in written:
        if item.result.warning:
            out().print(f"[yellow]warning[/]: {escape(item.result.source.name)}: {escape(item.result.warning)}")
    if not any(item.target is not None for item in written):
        raise RigError("no photo could be edited")


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
    strength: Annotated[
        str | None,
        typer.Option(
            help="Evaluate rig edit's method at the photo's size at these strengths, e.g. 0,0.3,0.6,1 (one run "
            "per value and model), instead of the paper's edit at the model's size.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed, recorded in metrics.json (inversion and sampling are deterministic).")
    ] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for metrics.json and report.html (default: eval-NAME).", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an earlier metrics.json and report.html.")] = False,
    cross: Annotated[
        bool,
        typer.Option(
            "--cross",
            help="Issue 27's pairs measure instead of the suite: each photo A edited to each other photo B's pose, "
            "expression and light (as `rig edit A --pose-from B --expression-from B --light-from B`), scored "
            "against B itself, aligned by dlib's landmarks (mean error in 8-bit levels over B's face); A unedited "
            f"and the physical edit (strength 0) beside the model's edit at each --strength (default "
            f"{DEFAULT_STRENGTH:g}). Needs 2+ photos.",
        ),
    ] = False,
) -> None:
    """Measure identity, fidelity and edit accuracy on photos the model did not train on.

    Per photo a fixed suite: reconstruction (no edit), light from left, right, top and bottom, smile
    0.8, jaw open 0.6, blink 1, yaw 12 and -12 degrees, and a transfer of light, expression and pose
    from each other photo. At a --strength, also issue 26's measures from dlib's landmarks (light
    balance, mouth, eyelids, nose, foreign pixels, colour blotches) and the bounds each edit misses.
    Writes metrics.json (every edit, and means per edit type, rounded to 4 decimals) and report.html
    (self-contained: the same summary, the measures with a contact sheet at the photo's size, and
    one image grid per edit type). With --cross, the pairs measure instead: per ordered pair and on
    the mean, each method's error and its change against the physical edit, whether the model's edit
    is 10 % better, and a sheet per pair (A | physical | model | B, aligned to B).
    """

    strengths = _parse_strengths(strength)
    device = use_device(device)
    with progress_bar() as progress:
        task = progress.add_task("reading", total=None)
        run = run_eval(
            store_of(ctx), name, out_dir, holdout=holdout, photos=photos, model=model, steps=steps, engine=engine,
            compare=compare, strengths=strengths, seed=seed, device=device, force=force, cross=cross,
            on_progress=lambda label, done, total: progress.update(
                task, description=escape(label)[:48], completed=done, total=total
            ),
        )  # fmt: skip
    doc = run.doc
    if cross:
        _print_cross(name, run)
        return
    table = Table(title=f"eval {escape(name)}: {run.photos} photo(s), seed {seed}", title_justify="left")
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
    out().print(f"metrics: {escape(str(run.metrics_path))}\nreport:  {escape(str(run.report_path))}")


def _print_cross(name: str, run) -> None:
    """The pairs measure's table: a row per ordered pair and the mean, per method the error (8-bit
    levels) and its change against the physical edit; then the verdict per strength."""
    cross = run.doc["cross"]
    methods = cross["mean"]["methods"]
    title = f"eval {escape(name)} --cross: {run.photos} photo(s), {cross['steps']} steps; error (vs physical edit)"
    table = Table(title=title, title_justify="left")
    table.add_column("A to B", no_wrap=True)
    for method in methods:
        table.add_column(escape(method["label"]), justify="right")

    def cell(method: dict) -> str:
        if method.get("error") is None:
            return f"[yellow]{escape(method.get('reason') or '-')}[/]"
        return cross_cell(method)

    for pair in cross["pairs"]:
        label = escape(f"{pair['a']} to {pair['b']}")
        if pair["reason"]:
            table.add_row(label, f"[yellow]{escape(pair['reason'])}[/]", *[""] * (len(methods) - 1))
        else:
            table.add_row(label, *(cell(m) for m in pair["methods"]))
    table.add_row(f"mean ({cross['mean']['pairs']} pairs)", *(cell(m) for m in methods), style="bold")
    out().print(table)
    for verdict in cross["verdicts"]:
        colour = {True: "green", False: "red", None: "yellow"}[verdict["better_by_bound"]]
        out().print(f"[{colour}]{escape(verdict['text'])}[/]")
    for line in cross["foreign"]:
        colour = {True: "green", False: "red", None: "yellow"}[line["within_bound"]]
        out().print(f"[{colour}]{escape(line['text'])}[/]")
    out().print(f"metrics: {escape(str(run.metrics_path))}\nreport:  {escape(str(run.report_path))}")


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
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """The whole pipeline on the public-domain astronaut photo: album, 3D fit, a tiny model, edits.

    Writes to OUT: album/, home/ (the store, unless --home is given), aligned.png, fit.png,
    edits/*.png and edits/sheet.png. Runs offline: the face model is the compact ICT FaceKit in the
    package, unless the store holds an imported one (or --ict gives a copy to import).
    """

    explicit_home = ctx.find_root().params.get("home") is not None
    store = store_of(ctx) if explicit_home else Store(out_dir / "home")
    if quick:
        photos, steps = min(photos, 6), min(steps, 40)
    device = use_device(device)
    with progress_bar() as progress:
        task = progress.add_task("preparing", total=None, visible=False)

        def moved(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total, visible=True)

        result = run_demo(
            store, out_dir, photos, steps, ict, device=device,
            add=lambda *args: add_with_progress(*args, progress=progress),
            on_message=lambda text: progress.console.print(escape(text)), on_progress=moved,
        )  # fmt: skip
    console = out()
    console.print(f"aligned crops: {escape(str(result.aligned))}; 3D fit: {escape(str(result.fit))}")
    console.print(
        f"edits of the whole photo ({', '.join(DEMO_EDITS)}) and a sheet (input | physical edit | output | "
        f"displacement | shading ratio): "
        f"{escape(str(out_dir / 'edits'))}"
    )
    for label, warning in result.warnings.items():
        console.print(f"[yellow]warning[/]: {escape(label)}: {escape(warning)}")
    console.print(
        "This shows the pipeline, not the paper's quality: a 64-pixel model trained from scratch for "
        f"{result.steps} steps on one album. For that quality use a GPU, the paper preset and a stage-1 "
        "base model: rig pretrain ... then rig finetune NAME --base MODEL (see the README)."
    )


@app.command("studio")
@handles_errors
def studio_command(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but 127.0.0.1 lets other machines in (a warning).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 7860,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    engine: Annotated[
        str, typer.Option(help="The UNet's runtime at first (the page can change it): torch, torch-bf16, onnx, ...")
    ] = "torch",
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir",
            help="Where edits (and the page's uploads) are written; default the store's studio/.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Edit in the browser: sliders for every control of rig edit, a live preview, before/after at full size.

    Needs the studio extra: pip install 'rig\\[studio]'. Stop it with Ctrl-C."""
    if host not in LOOPBACK:
        err().print(
            f"[yellow]warning[/]: listening on {escape(host)}: anyone who can reach this machine can use the studio"
            " and its people's photos"
        )

    def ready(url: str) -> None:
        out().print(f"rig studio: {escape(url)} (Ctrl-C to stop)")

    serve(
        store_of(ctx), host=host, port=port, device=use_device(device), engine=engine, out_dir=out_dir,
        on_ready=ready,
    )  # fmt: skip
