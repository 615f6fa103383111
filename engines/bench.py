"""``rig bench``: the paper's configuration against each engine and setting, in one process and run.

The baseline is what the paper ran: the UNet in fp32, eager, 20 DDIM steps, batch 1, with the DDIM
inversion when it is on (an edit then calls the UNet 20 + 19 times). Every other run is one engine
spec at one batch size and step count. For each, two timings: milliseconds per UNet call (the engine
alone, at that batch) and seconds per edit (encoder, inversion and sampling through the real DDIM
loop, divided by the batch). From them: edits per second, the speed-up over the baseline, and the
fraction of the GPU's peak that the counted FLOPs per call imply. The model has random weights
(speed does not depend on training) unless a saved model is named, whose weights then make the
accuracy columns speak of that model. Engines that cannot run here are reported as skipped, with why.

Each run also says how far its output is from fp32: the relative error of one UNet call against the
fp32 eager module on the same inputs, and the PSNR of its whole edit (inversion, then sampling with
mirrored buffers) against the fp32 eager edit of the same inputs and noise. So a fast setting is
never reported without the accuracy it costs. The references are computed untimed in strict fp32
(TF32 off on a GPU, for the encoder too) and kept on the host; on a CPU the torch-fp32 run's own
edit is the reference (``edit_is_reference``). Peak memory is counted from after an engine's setup
(an export or a TensorRT build), which is timed on its own (``setup_s``)."""

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

from engines import EngineSpec, make_engine
from engines.onnx import weights_hash
from rigcli import RigError, __version__
from rigcli.diffusion.checkpoints import load_model, model_info
from rigcli.diffusion.schedule import Diffusion, ddim_invert, ddim_sample, ddim_timesteps
from rigcli.diffusion.unet import DiffusionRig, preset
from rigcli.image.metrics import psnr

# dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets;
# longer names first so that "H100 PCIe" wins over "H100"
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "V100": 125.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}
BASELINE = {"engine": "torch-fp32", "batch": 1, "steps": 20}
DEFAULT_ENGINES = ("torch-fp32", "torch-fp16", "onnx", "trt")


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


def known_peak(device: str) -> float | None:
    """The dense fp16 tensor peak of a known GPU, TFLOP/s (None for CPUs and GPUs not in the table)."""
    if torch.device(device).type != "cuda":
        return None
    name = device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


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


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """||value - expected|| / ||expected||, in fp32."""
    value, expected = value.float(), expected.float()
    return float((value - expected).norm() / expected.norm().clamp_min(1e-30))


def unet_calls(steps: int, invert: bool) -> int:
    """UNet calls of one edit: ``steps`` to sample, ``steps - 1`` to invert (ddim_invert's moves)."""
    return steps + (steps - 1 if invert else 0)


def run_bench(plan: BenchPlan, on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Measure the baseline and every (engine, batch, steps) of ``plan``; the JSON-ready report."""

    device = plan.device
    torch.manual_seed(plan.seed)
    if plan.model_dir is not None:  # trained weights: the accuracy columns then speak of a real model
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
    peak = plan.peak_tflops or known_peak(device)
    model = model.to(device)
    size, diffusion = cfg.image_size, Diffusion()
    largest = max([*plan.batches, BASELINE["batch"]])
    g = torch.Generator().manual_seed(plan.seed)
    images = (torch.rand(largest, 3, size, size, generator=g) * 2 - 1).to(device)
    buffers = torch.rand(largest, 9, size, size, generator=g).to(device)

    reference = model.denoisingUNet  # fp32 eager: what every engine's accuracy is measured against
    fp32_eager = EngineSpec("torch", "fp32")
    reference_eps: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # batch -> (t, latent, eps)
    reference_edits: dict[tuple[int, int], torch.Tensor] = {}  # (batch, steps) -> output

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
    call_ms: dict[tuple[str, int], float] = {}
    call_error: dict[tuple[str, int], float] = {}
    tmp = tempfile.TemporaryDirectory(prefix="rig-bench-")
    try:
        for run, is_baseline in runs:
            spec_text, batch, steps = run["engine"], run["batch"], run["steps"]
            if on_progress:
                on_progress(f"{spec_text} batch {batch} steps {steps}", done, total)
            row = {
                **run,
                "baseline": is_baseline,
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
                if spec_text not in engines:  # setup (export, build) is timed apart, and kept out of peak memory
                    started = time.perf_counter()
                    unet = copy.deepcopy(model.denoisingUNet)  # an engine may change dtype or layout in place
                    engine = make_engine(spec, unet, Path(tmp.name), size, device, max_batch=largest)
                    engines[spec_text] = (engine, time.perf_counter() - started)
                engine, setup = engines[spec_text]
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(torch.device(device))
                with torch.no_grad():
                    latent = model.encode(x)
                    if (spec_text, batch) not in call_ms:
                        # warm-up (kernel choice, graph capture, compilation), and the one-call accuracy on
                        # exactly the reference's inputs (its latent too)
                        call_error[(spec_text, batch)] = relative_error(engine(x, t, b, z), expected)
                        del z, expected
                        _sync(device)
                        started = time.perf_counter()
                        for _ in range(plan.calls):
                            engine(x, t, b, latent)
                        _sync(device)
                        call_ms[(spec_text, batch)] = (time.perf_counter() - started) / plan.calls * 1000
                    best = float("inf")
                    for _ in range(plan.repeats):
                        _sync(device)
                        started = time.perf_counter()
                        output = edit(engine, x, b, steps)
                        _sync(device)
                        best = min(best, time.perf_counter() - started)
                    memory = peak_memory_mb(device)
                    is_reference = (  # on a CPU (no TF32) the first fp32 eager edit of a shape is the reference
                        spec == fp32_eager
                        and torch.device(device).type == "cpu"
                        and (batch, steps) not in reference_edits
                    )
                    if is_reference:
                        reference_edits[(batch, steps)] = output.cpu()
                    if (batch, steps) not in reference_edits:  # untimed, encoder and UNet in strict fp32
                        with strict_fp32():
                            reference_edits[(batch, steps)] = edit(reference, x, b, steps).cpu()
                    edit_psnr = psnr(output.float().cpu(), reference_edits[(batch, steps)], value_range=(-1, 1))
                ms = call_ms[(spec_text, batch)]
                achieved = gflops * batch / ms  # GFLOP per ms = TFLOP/s
                rows.append({
                    **row, "status": "ok", "setup_s": round(setup, 3), "ms_per_unet_call": ms,
                    "seconds_per_batch": best, "seconds_per_edit": best / batch, "edits_per_s": batch / best,
                    "peak_memory_mb": memory, "achieved_tflops": achieved,
                    "fraction_of_peak": achieved / peak if peak else None,
                    "call_error_vs_fp32": call_error[(spec_text, batch)], "edit_psnr_vs_fp32": edit_psnr,
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
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "device_name": device_name(device),
        "versions": _versions(),
        "preset": plan.preset if plan.model_dir is None else None,
        "model": str(plan.model_dir) if plan.model_dir is not None else None,
        "weights": weights_hash(model.denoisingUNet) if plan.model_dir is not None else "random",
        "image_size": size,
        "unet_parameters": info["unet_parameters"],
        "unet_gflops_per_call": gflops,
        "peak_tflops": peak,
        "peak_source": "--peak-tflops" if plan.peak_tflops else ("table (dense fp16)" if peak else None),
        "peak_memory": "torch.cuda.max_memory_allocated per run (TensorRT's own allocations not included)"
        if torch.device(device).type == "cuda"
        else "process peak RSS so far (ru_maxrss)",
        "invert": plan.invert,
        "repeats": plan.repeats,
        "calls": plan.calls,
        "baseline": baseline,
        "runs": rows[1:],
    }
