"""``rig bench``: the paper's configuration against each engine and setting, in one process and run.

The baseline is what the paper ran: the UNet in strict fp32 (no TF32: the paper's V100s had none),
eager, with its separate elementwise passes (``torch-fp32-unfused``), 20 DDIM steps, batch 1, with the
DDIM inversion when it is on (an edit then calls the UNet 20 + 19 times). Every other run is one
engine spec at one batch size and step count, under torch's default settings (TF32 convolutions on
a GPU). For each, two timings: milliseconds per UNet call (the engine alone, at that batch and TF32
setting) and seconds per edit (encoder, inversion and sampling through the real DDIM loop, divided by
the batch). From them: edits per second, the speed-up over the baseline, and the fraction of the
device's peak that the counted FLOPs per call imply, against dense matmul peaks measured in the same
run for the row's arithmetic (``measure_peak``: bf16, fp16, fp32 with TF32 or without). The model has
random weights (speed does not depend on training) unless one is given: a saved model, or one the
caller trained (``rig bench --train-steps``), whose weights then make the accuracy columns speak of
a trained model. Engines that cannot run here are reported as skipped, with why.

Each run also says how far its output is from fp32: the relative error of one UNet call against the
fp32 eager unfused module (the paper's computation) on the same inputs, and the PSNR of its whole
edit (inversion, then sampling with mirrored buffers) against that module's edit of the same inputs
and noise. So a fast setting is never reported without the accuracy it costs. The references are
computed untimed in strict fp32 (TF32 off on a GPU, for the encoder too) and kept on the host; on a
CPU the baseline's own edit is the reference for its shape (``edit_is_reference``). Peak memory is
counted from after an engine's setup (an export or a TensorRT build), which is timed on its own
(``setup_s``); a compiled engine compiles on its first call at each batch size, the warm-up, whose
time is reported apart (``first_call_s``)."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata as md
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines import DTYPES, EngineSpec, make_engine
from engines.onnx import weights_hash
from rigcli import RigError, __version__
from rigcli.diffusion.checkpoints import load_model, model_info
from rigcli.diffusion.schedule import Diffusion, ddim_invert, ddim_sample, ddim_timesteps
from rigcli.diffusion.unet import DiffusionRig, preset
from rigcli.image.metrics import psnr

BASELINE = {"engine": "torch-fp32-unfused", "batch": 1, "steps": 20}  # run in strict fp32
DEFAULT_ENGINES = ("torch-fp32", "torch-fp16", "onnx", "trt")
# what `rig bench` measures unless told: the fused and unfused UNet, half precision eager, graphs and
# compiled, and the exported runtimes (on a CPU: no fp16, graphs or TensorRT; compiled in fp32)
DEVICE_ENGINES = {
    "cuda": ("torch-fp32", "torch-fp32-unfused", "torch-bf16-cl-graphs", "torch-bf16-cl-compile",
             "torch-bf16-cl-compile-graphs", "torch-fp16-cl-graphs", "onnx", "trt"),
    "cpu": ("torch-fp32", "torch-fp32-unfused", "torch-bf16", "torch-fp32-compile", "onnx"),
}  # fmt: skip


def default_engines(device: str) -> tuple[str, ...]:
    """The engine specs ``rig bench`` measures on ``device`` unless it is given some."""
    return DEVICE_ENGINES["cuda" if torch.device(device).type == "cuda" else "cpu"]


@dataclass
class BenchPlan:
    """What to measure."""

    preset: str = "paper"
    batches: Sequence[int] = (1, 8, 32)
    steps: Sequence[int] = (20, 10)
    engines: Sequence[str] = DEFAULT_ENGINES
    device: str = "cuda"
    invert: bool = True
    repeats: int = 2  # timed edits per run (the fastest counts)
    calls: int = 5  # timed UNet calls per engine and batch (after a warm-up call)
    peak_tflops: float | None = None
    seed: int = 0
    model_dir: Path | None = None  # a saved model (its config and weights) instead of the preset's random weights
    compile_cache: Path | None = None  # where torch.compile keeps what it compiled (engines.eager)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse a plan that cannot run before minutes of measuring: a typo in an engine, a CUDA
        device torch cannot see, a model folder with no model."""
        for spec in self.engines:
            EngineSpec.parse(spec)
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise RigError("--device cuda: torch sees no CUDA GPU (install torch's CUDA build, or use --device cpu)")
        if self.model_dir is not None and not (Path(self.model_dir) / "model.json").is_file():
            raise RigError(f"--model {self.model_dir}: no model there (model.json missing)")


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def peak_memory_mb(device: str) -> float:
    """Peak memory: torch's CUDA allocator on a GPU (since the last reset), else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    import resource  # POSIX only: the peak RSS of this process

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _versions() -> dict:

    found = {"rig": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for package in ("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found


@contextlib.contextmanager
def strict_fp32():
    """fp32 without TF32 while inside (cuDNN convolutions use TF32 by default on Ampere and later)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def measure_peak(device: str, precision: str, size: int | None = None, repeats: int = 5) -> float:
    """The device's dense matmul throughput in TFLOP/s for ``precision`` ("bf16", "fp16", "fp32" without
    TF32, "tf32"): the best of ``repeats`` products of two square matrices (8192 on a GPU, 1024 on a CPU),
    after a warm-up. What "% of peak" divides by: measured on this device in this run, not read from a
    data sheet (an H200 measured 772 TFLOP/s in bf16 where the sheet says 989)."""
    cuda = torch.device(device).type == "cuda"
    size = size or (8192 if cuda else 1024)
    dtype = torch.float32 if precision == "tf32" else DTYPES[precision]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        best = float("inf")
        for i in range(repeats + 1):
            _sync(device)
            started = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            if i:  # the first is the warm-up (kernel choice, allocation)
                best = min(best, time.perf_counter() - started)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * size**3 / best / 1e12


def peak_precision(spec: EngineSpec, device: str, strict: bool) -> str:
    """Which measured peak a run's arithmetic is held against. On a GPU its precision, and "tf32" for
    fp32 runs that may use TF32 (torch's convolutions do by default; the strict baseline does not). On
    a CPU always fp32: its vector units' own rate (torch's fp16 CPU matmul is a slow fallback, not what
    ONNX Runtime runs, and CPUs without bf16 units convert bf16 to fp32)."""
    if torch.device(device).type != "cuda":
        return "fp32"
    if spec.precision == "fp32" and not strict:
        return "tf32"
    return spec.precision


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """||value - expected|| / ||expected||, in fp32."""
    value, expected = value.float(), expected.float()
    return float((value - expected).norm() / expected.norm().clamp_min(1e-30))


def unet_calls(steps: int, invert: bool) -> int:
    """UNet calls of one edit: ``steps`` to sample, ``steps - 1`` to invert (ddim_invert's moves)."""
    return steps + (steps - 1 if invert else 0)


def run_bench(
    plan: BenchPlan,
    on_progress: Callable[[str, int, int], None] | None = None,
    model: DiffusionRig | None = None,
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    weights: str | None = None,
) -> dict:
    """Measure the baseline and every (engine, batch, steps) of ``plan``; the JSON-ready report.

    ``model``: weights to measure (e.g. trained by the caller) instead of ``plan``'s; ``inputs``: the
    clean images and buffers to edit (at least the largest batch; default: random); ``weights``: how
    to describe the weights in the report."""

    device = plan.device
    torch.manual_seed(plan.seed)
    if model is not None:
        cfg = model.cfg
        model = model.eval()
    elif plan.model_dir is not None:  # trained weights: the accuracy columns then speak of a real model
        model, _ = load_model(plan.model_dir)
        cfg = model.cfg
    else:
        cfg = preset(plan.preset)
        model = DiffusionRig(cfg).eval()
        with torch.no_grad():  # the zero-initialised output layers would make every output 0
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(std=0.02)
    info = model_info(cfg)
    gflops = info["unet_gflops_per_call"]
    model = model.to(device)
    size, diffusion = cfg.image_size, Diffusion()
    largest = max([*plan.batches, BASELINE["batch"]])
    if inputs is not None:
        images, buffers = (v[:largest].to(device) for v in inputs)
        if len(images) < largest:
            raise RigError(f"bench inputs: {len(images)} images for a largest batch of {largest}")
    else:
        g = torch.Generator().manual_seed(plan.seed)
        images = (torch.rand(largest, 3, size, size, generator=g) * 2 - 1).to(device)
        buffers = torch.rand(largest, cfg.condition_channels, size, size, generator=g).to(device)

    # what every engine's accuracy is measured against: the paper's computation (fp32, eager, the
    # separate elementwise passes), run in strict fp32
    reference = copy.deepcopy(model.denoisingUNet).set_fused(False)
    paper_eager = EngineSpec.parse(BASELINE["engine"])
    reference_eps: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # batch -> (t, latent, eps)
    reference_edits: dict[tuple[int, int], torch.Tensor] = {}  # (batch, steps) -> output
    peaks: dict[str, float] = {}  # precision -> measured TFLOP/s

    def edit(engine, x, b, steps):
        """One whole edit of ``x``: inversion with ``b`` (or seeded noise), sampling with ``b`` mirrored."""
        z, ts = model.encode(x), ddim_timesteps(steps)
        if plan.invert:
            x_T = ddim_invert(lambda x_t, t: engine(x_t, t, b, z), x, diffusion, ts)
        else:
            x_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(plan.seed)).to(device)
        return ddim_sample(lambda x_t, t: engine(x_t, t, b.flip(-1), z), x_T, diffusion, ts, clip=not plan.invert)

    runs = [(dict(BASELINE), True)]
    runs += [
        ({"engine": e, "batch": b, "steps": s}, False) for e in plan.engines for b in plan.batches for s in plan.steps
    ]
    done, total = 0, len(runs)
    rows: list[dict] = []
    engines: dict[str, tuple] = {}  # spec -> (engine, setup seconds) or (None, reason)
    # per-call timings and errors by (spec, batch, strict fp32): the strict baseline and a TF32 run of
    # the same engine and batch are different measurements
    call_ms: dict[tuple[str, int, bool], float] = {}
    call_error: dict[tuple[str, int, bool], float] = {}
    first_call: dict[tuple[str, int, bool], float] = {}  # seconds of the warm-up call: a compilation's time
    current = {"label": ""}

    def status(text: str) -> None:
        """What an engine says while it works at length (a compilation), shown on the progress line."""
        if on_progress:
            on_progress(f"{current['label']}: {text}", done, total)

    tmp = tempfile.TemporaryDirectory(prefix="rig-bench-")
    try:
        for run, strict in runs:
            spec_text, batch, steps = run["engine"], run["batch"], run["steps"]
            current["label"] = f"{spec_text} batch {batch} steps {steps}"
            if on_progress:
                on_progress(current["label"], done, total)
            row = {
                **run,
                "baseline": strict,
                "strict_fp32": strict,
                "invert": plan.invert,
                "unet_calls_per_edit": unet_calls(steps, plan.invert),
            }
            try:
                spec = EngineSpec.parse(spec_text)
                reason = spec.unavailable(device)
                if reason:
                    rows.append({**row, "status": "skipped", "reason": reason})
                    continue
                x, b = images[:batch], buffers[:batch]
                if batch not in reference_eps:  # kept on the host, out of the device's memory count
                    t = (torch.arange(batch, device=device) * 2 + 1) * 1000 // (2 * batch)  # spread over 0..999
                    with torch.no_grad(), strict_fp32():
                        z = model.encode(x)
                        reference_eps[batch] = (t.cpu(), z.cpu(), reference(x, t, b, z).cpu())
                t, z, expected = (v.to(device) for v in reference_eps[batch])
                precision = peak_precision(spec, device, strict)
                if not plan.peak_tflops and precision not in peaks:
                    if on_progress:
                        on_progress(f"measuring the {precision} matmul peak", done, total)
                    peaks[precision] = measure_peak(device, precision)
                if spec_text not in engines:  # setup (export, build) is timed apart, and kept out of peak memory
                    started = time.perf_counter()
                    unet = copy.deepcopy(model.denoisingUNet)  # an engine may change dtype or layout in place

                    engine = make_engine(
                        spec, unet, Path(tmp.name), size, device, max_batch=largest,
                        compile_cache=plan.compile_cache, on_status=status,
                    )  # fmt: skip
                    engines[spec_text] = (engine, time.perf_counter() - started)
                engine, setup = engines[spec_text]
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(torch.device(device))
                key = (spec_text, batch, strict)
                with torch.no_grad(), strict_fp32() if strict else contextlib.nullcontext():
                    latent = model.encode(x)
                    if key not in call_ms:
                        # warm-up (kernel choice, graph capture, compilation: timed as first_call_s), and the
                        # one-call accuracy on exactly the reference's inputs (its latent too)
                        _sync(device)
                        started = time.perf_counter()
                        first = engine(x, t, b, z)
                        _sync(device)
                        first_call[key] = time.perf_counter() - started
                        call_error[key] = relative_error(first, expected)
                        del z, expected
                        _sync(device)
                        started = time.perf_counter()
                        for _ in range(plan.calls):
                            engine(x, t, b, latent)
                        _sync(device)
                        call_ms[key] = (time.perf_counter() - started) / plan.calls * 1000
                    best = float("inf")
                    for _ in range(plan.repeats):
                        _sync(device)
                        started = time.perf_counter()
                        output = edit(engine, x, b, steps)
                        _sync(device)
                        best = min(best, time.perf_counter() - started)
                    memory = peak_memory_mb(device)
                    is_reference = (  # on a CPU the first strict paper-eager edit of a shape is the reference
                        spec == paper_eager
                        and torch.device(device).type == "cpu"
                        and (batch, steps) not in reference_edits
                    )
                    if is_reference:
                        reference_edits[(batch, steps)] = output.cpu()
                if (batch, steps) not in reference_edits:  # untimed, encoder and UNet in strict fp32
                    with torch.no_grad(), strict_fp32():
                        reference_edits[(batch, steps)] = edit(reference, x, b, steps).cpu()
                edit_psnr = psnr(output.float().cpu(), reference_edits[(batch, steps)], value_range=(-1, 1))
                ms = call_ms[key]
                achieved = gflops * batch / ms  # GFLOP per ms = TFLOP/s
                peak = plan.peak_tflops or peaks[precision]
                rows.append({
                    **row, "status": "ok", "setup_s": round(setup, 3), "first_call_s": round(first_call[key], 3),
                    "ms_per_unet_call": ms,
                    "seconds_per_batch": best, "seconds_per_edit": best / batch, "edits_per_s": batch / best,
                    "peak_memory_mb": memory, "achieved_tflops": achieved, "peak_precision": precision,
                    "peak_tflops": peak, "fraction_of_peak": achieved / peak,
                    "call_error_vs_fp32": call_error[key], "edit_psnr_vs_fp32": edit_psnr,
                    "edit_is_reference": is_reference,
                })  # fmt: skip
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # one engine failing must not lose the others' figures
                rows.append({**row, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
            finally:
                done += 1
    finally:
        engines.clear()
        tmp.cleanup()
    baseline = rows[0]
    for row in rows:
        ok = row["status"] == "ok" and baseline["status"] == "ok"
        row["speedup"] = row["edits_per_s"] / baseline["edits_per_s"] if ok else None
    if on_progress:
        on_progress("done", total, total)
    if weights is None:
        weights = "random" if plan.model_dir is None else f"saved model {weights_hash(model.denoisingUNet)}"
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "device_name": device_name(device),
        "versions": _versions(),
        "preset": plan.preset if plan.model_dir is None else None,
        "model": str(plan.model_dir) if plan.model_dir is not None else None,
        "weights": weights,
        "weights_hash": weights_hash(model.denoisingUNet),
        "image_size": size,
        "unet_parameters": info["unet_parameters"],
        "unet_gflops_per_call": gflops,
        "peak_tflops": {"given": plan.peak_tflops} if plan.peak_tflops else peaks,
        "peak_source": "--peak-tflops, for every run"
        if plan.peak_tflops
        else "measured in this run: the best of 5 dense square matmuls (8192 on a GPU, 1024 on a CPU) per "
        "precision; each run is held against its own precision's (fp32 runs on a GPU against TF32's, "
        "the strict baseline against fp32 without TF32)",
        "peak_memory": "torch.cuda.max_memory_allocated per run (TensorRT's own allocations not included)"
        if torch.device(device).type == "cuda"
        else "process peak RSS so far (ru_maxrss)",
        "invert": plan.invert,
        "repeats": plan.repeats,
        "calls": plan.calls,
        "baseline": baseline,
        "runs": rows[1:],
    }
