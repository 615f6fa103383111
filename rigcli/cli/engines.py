"""Commands over the UNet engines: export-onnx, export-trt, engines, bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import TaskID
from rich.table import Table

from engines.bench import BenchPlan, default_engines
from rigcli import RigError
from rigcli.cli.common import (
    DEVICE_HELP,
    Preset,
    app,
    engines_app,
    err,
    handles_errors,
    out,
    progress_bar,
    say_waiting,
    store_of,
    use_device,
)
from rigcli.edit.export import export_onnx, export_trt, list_artifacts, remove_artifacts
from rigcli.files import atomic_write_json
from rigcli.train.stages import bench


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
    with err().status("loading the model") as status:
        path = export_onnx(store_of(ctx), name, fp16, opset, max_batch, model, say_waiting, status.update)
    out().print(f"ONNX engine: {escape(str(path))}")


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
    with err().status("loading the model") as status:
        path = export_trt(store_of(ctx), name, fp16, max_batch, model, say_waiting, status.update)
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

    store = store_of(ctx)
    with store.locked(store.require(name), on_wait=say_waiting):
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
    ctx: typer.Context,
    preset: Annotated[
        Preset,
        typer.Option(help="Model configuration (random weights unless --train-steps: speed does not need training)."),
    ] = (Preset.paper),
    model: Annotated[
        Path | None,
        typer.Option(
            help="A saved model folder (e.g. people/NAME/model in the store) instead of --preset: its own size "
            "and trained weights, so the accuracy columns describe that model. Inputs stay random.",
            show_default=False,
        ),
    ] = None,
    train_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="Train the preset's model from scratch for this many steps on synthetic blobs first (the "
            "training loop of rig finetune), and measure every engine's accuracy on it, editing held-out blobs: "
            "accuracy on random weights says nothing of a trained model's edits. A few hundred steps: about a "
            "minute for --preset tiny on a CPU.",
        ),
    ] = 0,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32",
    steps: Annotated[str, typer.Option(help="DDIM step counts, comma-separated.")] = "20,10",
    engines: Annotated[
        str,
        typer.Option(
            help="Engine specs, comma-separated: torch-fp32, torch-fp16, torch-bf16, with -cl (channels-last), "
            "-compile (torch.compile), -graphs (CUDA graphs), -unfused (the UNet's separate elementwise passes); "
            "onnx, onnx-fp16; trt (fp16), trt-fp32. Default: on CUDA "
            + ",".join(default_engines("cuda"))
            + "; on a CPU "
            + ",".join(default_engines("cpu"))
            + ".",
            show_default=False,
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    no_invert: Annotated[
        bool, typer.Option("--no-invert", help="Edits without DDIM inversion (sampling calls only).")
    ] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Timed edits per run; the fastest counts.")] = 2,
    calls: Annotated[int, typer.Option(min=1, help="Timed UNet calls per engine and batch, after a warm-up.")] = 5,
    peak_tflops: Annotated[
        float | None,
        typer.Option(
            help="The device's peak in TFLOP/s for the %-of-peak column, for every run. Default: measured in the "
            "run, a dense matmul per precision the runs use (bf16, fp16, fp32, and TF32 for fp32 on a GPU).",
            show_default=False,
        ),
    ] = None,
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the full results as JSON.")] = Path(
        "rig-bench.json"
    ),
) -> None:
    """Time the paper's configuration (fp32 without TF32, eager, unfused, 20 DDIM steps, batch 1, with
    inversion) and each engine x batch x steps in one run: ms per UNet call, edits/s, speed-up, peak
    memory, % of the device's measured peak, and each one's accuracy against fp32 (one UNet call's
    relative error, the whole edit's PSNR)."""
    chosen = use_device(device)
    specs = [e.strip() for e in engines.split(",") if e.strip()]
    if specs == ["auto"]:
        specs = list(default_engines(chosen))
    if train_steps and model is not None:
        raise RigError("--train-steps trains the preset's model; --model measures a saved one: give one of them")
    plan = BenchPlan(
        preset=preset.value, batches=_int_list(batch, "--batch"), steps=_int_list(steps, "--steps"), engines=specs,
        device=chosen, invert=not no_invert, repeats=repeats, calls=calls, peak_tflops=peak_tflops,
        model_dir=model, compile_cache=store_of(ctx).root / "cache" / "inductor",
    )  # fmt: skip
    with progress_bar() as progress:
        tasks: dict[str, TaskID] = {}

        def stepped(step: int, loss: float) -> None:
            if "train" not in tasks:
                tasks["train"] = progress.add_task(f"training the {preset.value} model on blobs", total=train_steps)
            progress.update(tasks["train"], completed=step)

        def moved(label: str, done: int, total: int) -> None:
            if "train" in tasks:
                progress.remove_task(tasks.pop("train"))
            if "bench" not in tasks:
                tasks["bench"] = progress.add_task("benchmark", total=1)
            progress.update(tasks["bench"], description=escape(label), completed=done, total=total)

        report = bench(plan, train_steps, on_step=stepped, on_progress=moved)
    atomic_write_json(json_path, report)
    base = report["baseline"]
    what = escape(report["preset"] or report["model"])
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in report["peak_tflops"].items()) or "none measured"
    table = Table(
        title=f"rig bench: {what} ({report['image_size']} px, {report['unet_gflops_per_call']:.1f} "
        f"GFLOPs/call, weights {escape(report['weights'])}) on {escape(report['device_name'])}",
        title_justify="left",
        caption="baseline: the paper's configuration (torch fp32 without TF32, eager, unfused, 20 DDIM steps, "
        "batch 1" + (", with inversion)" if plan.invert else ")") + ". % of peak: of the dense matmul peak of "
        f"the run's precision, TFLOP/s: {peaks} (" + ("given" if peak_tflops else "measured in this run")
        + "). error / call: relative error of one UNet call against fp32; edit dB: PSNR of the whole edit "
        "against the fp32 edit of the same inputs",
    )  # fmt: skip
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
        table.add_row(
            label, str(row["batch"]), str(row["steps"]), f"{row['ms_per_unet_call']:.1f}",
            f"{row['edits_per_s']:.2f}", f"{row['speedup']:.2f}x" if row["speedup"] is not None else "n/a",
            f"{row['peak_memory_mb']:.0f}", f"{100 * row['fraction_of_peak']:.1f}% {row['peak_precision']}",
            f"{row['call_error_vs_fp32']:.1e}",
            "ref" if row["edit_is_reference"] else f"{row['edit_psnr_vs_fp32']:.1f}", "",
        )  # fmt: skip
    out().print(table)
    out().print(f"results: {escape(str(json_path))}")
