"""What every command shares: the Typer apps, error and interrupt handling, consoles, progress."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

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

from rigcli import RigError, __version__
from rigcli.device import resolve_device
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


engines_app = typer.Typer(help="Exported UNet engines (ONNX, TensorRT) kept in the store.", no_args_is_help=True)


app.add_typer(people_app, name="people")


app.add_typer(assets_app, name="assets")


app.add_typer(models_app, name="models")


app.add_typer(model_app, name="model")


app.add_typer(engines_app, name="engines")


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


DEVICE_HELP = "torch device: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda, cuda:1, ..."


def use_device(device: str) -> str:
    """Resolve ``--device`` (``auto`` by default) and say which device the command runs on."""
    chosen = resolve_device(device)
    err().print(f"device: {chosen}" + (" (auto)" if device.strip().lower() == "auto" else ""))
    return chosen


def store_of(ctx: typer.Context) -> Store:
    return ctx.find_root().obj


def say_waiting(holder: LockHolder | None) -> None:
    who = holder.describe() if holder else "another rig process"
    err().print(f"[yellow]waiting[/]: this person is locked by {escape(who)}")


def progress_bar() -> Progress:
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


FACE_MODEL_OPTION = typer.Option(
    "--face-model",
    help="3D face model to fit: ict (ICT-FaceKit) or flame (the paper's; needs `rig assets import-flame`). "
    "Default: the person's current model, else ict.",
    show_default=False,
)


ESTIMATOR_OPTION = typer.Option(
    "--estimator",
    help="How FLAME parameters are estimated: deca (DECA's encoder, as the paper; needs its weights imported) "
    "or landmarks (the landmark fitter). Default: deca when its weights are imported, else landmarks.",
    show_default=False,
)


class Preset(str, Enum):
    paper = "paper"
    small = "small"
    tiny = "tiny"
