"""Engines: ONNX and TensorRT against torch, artifact keys and staleness, engines list/remove, rig bench.

The GPU tests (TensorRT, fp16, CUDA graphs, torch.compile) are skipped where no CUDA GPU / TensorRT is present.
"""

from __future__ import annotations

import copy
import json
import sys

import onnx
import pytest
import torch
from typer.testing import CliRunner

import engines
from engines import EngineSpec, default_engine, make_engine, missing_compiler, resolve_engine, torch_engine
from engines.onnx import artifact, onnx_engine
from engines.tensorrt import missing_tensorrt
from rigcli import RigError
from rigcli.cli import app
from rigcli.diffusion.checkpoints import load_model, model_info, save_model
from rigcli.diffusion.unet import DiffusionRig, preset
from rigcli.face.params import FaceFit
from rigcli.files import now_iso
from rigcli.render.buffers import light_from_direction, render_buffers
from rigcli.store import Manifest, Store

runner = CliRunner()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = DiffusionRig(preset("tiny")).eval()
    for p in model.parameters():  # give the zero-initialised output layers weights, so every path counts
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model.denoisingUNet


@pytest.fixture(scope="module")
def exported(unet, tmp_path_factory):
    return artifact(unet, tmp_path_factory.mktemp("engines"), 64)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_onnx_matches_torch_on_random_inputs(unet, exported):
    reference, onnx = torch_engine(unet), onnx_engine(exported, providers=[])  # CPU provider
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3, 8):  # the batch axis is dynamic
        x, b = torch.randn(batch, 3, 64, 64, generator=g), torch.randn(batch, 9, 64, 64, generator=g)
        t, z = torch.randint(0, 1000, (batch,), generator=g), torch.randn(batch, 64, generator=g)
        assert relative_error(onnx(x, t, b, z), reference(x, t, b, z)) < 1e-4


def test_a_model_conditioned_on_the_physical_edit_exports_with_its_edit_channels(tmp_path):
    """Issue 27: the edit's channels travel with the buffers (13 of them), so the ONNX export takes
    them on the same input and the engine interface is unchanged; they count in its output."""
    torch.manual_seed(0)
    model = DiffusionRig(preset("tiny", edit_channels=4)).eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    unet = model.denoisingUNet
    reference, onnx = torch_engine(unet), onnx_engine(artifact(unet, tmp_path, 64), providers=[])
    g = torch.Generator().manual_seed(2)
    x, b = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 13, 64, 64, generator=g)
    t, z = torch.tensor([20, 800]), torch.randn(2, 64, generator=g)
    assert relative_error(onnx(x, t, b, z), reference(x, t, b, z)) < 1e-4
    other = b.clone()
    other[:, 9:] = torch.randn(2, 4, 64, 64, generator=g)
    assert relative_error(onnx(x, t, other, z), onnx(x, t, b, z)) > 1e-3


@pytest.fixture(scope="module")
def rendered(face_model):
    """Two buffer sets rendered from the face model (two poses, one light)."""
    fit = FaceFit(
        torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.1]), torch.full((2,), 2.35),
        torch.tensor([[32.0, 39.5], [31.0, 40.0]]), torch.zeros(2, 53), torch.zeros(100),
        light_from_direction(torch.tensor([-0.5, 0.3, 1.0]), 0.8, 0.3)[None].expand(2, 9, 3).float(),
        torch.tensor([[0.7, 0.5, 0.4], [0.5, 0.4, 0.3]]),
    )  # fmt: skip
    return render_buffers(face_model, fit, 64)


def test_onnx_matches_torch_on_rendered_buffers(unet, exported, rendered):
    assert rendered.abs().sum() > 0
    x, t, z = torch.randn(2, 3, 64, 64), torch.tensor([0, 999]), torch.randn(2, 64)
    cpu = onnx_engine(exported, providers=[])  # the CPU provider (GPU ones may use TF32)
    assert relative_error(cpu(x, t, rendered, z), torch_engine(unet)(x, t, rendered, z)) < 1e-4


def half_inputs(rendered):
    """Random and rendered inputs, at early and late timesteps."""
    g = torch.Generator().manual_seed(5)
    x, z = torch.randn(3, 3, 64, 64, generator=g), torch.randn(3, 64, generator=g)
    yield x, torch.tensor([0, 500, 999]), torch.rand(3, 9, 64, 64, generator=g), z
    yield x[:2], torch.tensor([999, 20]), rendered, z[:2]


def test_onnx_fp16_on_the_cpu_is_within_1e_2_per_step(unet, rendered, tmp_path):
    """ONNX Runtime's CPU provider runs the fp16 export: each call within 1e-2 of fp32, and really not fp32."""
    engine = make_engine("onnx-fp16", copy.deepcopy(unet), tmp_path, 64, "cpu")
    model = onnx.load(str(next(tmp_path.rglob("model.onnx"))))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    reference = torch_engine(copy.deepcopy(unet))
    for args in half_inputs(rendered):
        error = relative_error(engine(*args), reference(*args))
        assert 1e-6 < error < 1e-2


def test_torch_half_precisions_per_step_on_the_cpu(unet, rendered, tmp_path):
    """The half-precision recipe (weights cast, GroupNorm kept in fp32) checked on the CPU's kernels,
    with the GPU tests' bounds: fp16 within 1e-2 per call (the issue's), bf16 within 6e-2 (its 8-bit
    mantissa rounds 8x coarser than fp16's 11 bits; measured here 4e-3 for fp16, 3.4e-2 for bf16)."""
    reference = torch_engine(copy.deepcopy(unet))
    fp16 = torch_engine(copy.deepcopy(unet), torch.float16)  # make_engine refuses it here: slow, not wrong
    bf16 = make_engine("torch-bf16", copy.deepcopy(unet), tmp_path, 64, "cpu")
    for args in half_inputs(rendered):
        expected = reference(*args)
        assert 1e-6 < relative_error(fp16(*args), expected) < 1e-2
        assert 1e-6 < relative_error(bf16(*args), expected) < 6e-2
    with pytest.raises(RigError, match="onnx-fp16 or torch-bf16"):
        make_engine("torch-fp16", copy.deepcopy(unet), tmp_path, 64, "cpu")


def test_artifacts_are_keyed_by_weights_and_settings(unet, exported):
    root = exported.parent.parent
    stamp = exported.stat().st_mtime_ns
    assert artifact(unet, root, 64) == exported and exported.stat().st_mtime_ns == stamp  # reused, not re-exported
    info = json.loads((exported.parent / "engine.json").read_text())
    assert {"weights", "precision", "opset", "torch", "onnx", "onnxruntime"} <= set(info)
    changed = DiffusionRig(preset("tiny")).denoisingUNet
    changed.load_state_dict(unet.state_dict())
    with torch.no_grad():
        changed.out[2].bias += 1.0
    stale = artifact(changed, root, 64)
    assert stale != exported  # new weights: a new artifact, the old one never used for them
    assert artifact(unet, root, 64, opset=18) not in (exported, stale)


def test_missing_onnx_says_what_to_install(monkeypatch, unet, tmp_path):
    import engines.onnx as module

    real = module.importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None if name == "onnx" else real(name))
    with pytest.raises(RigError, match=r"pip install 'rig\[onnx\]'"):
        artifact(unet, tmp_path, 64)


# ---------------------------------------------------------------- engine specs and torch options


def test_engine_specs_parse_and_refuse():
    spec = EngineSpec.parse("torch-fp16-cl-graphs")
    assert (spec.kind, spec.precision, spec.channels_last, spec.cuda_graphs) == ("torch", "fp16", True, True)
    assert EngineSpec.parse("trt").precision == "fp16" and EngineSpec.parse("onnx").precision == "fp32"
    for bad, words in (("tpu", "unknown engine"), ("onnx-graphs", "onnx takes options"), ("torch-fp16-bf16", "one")):
        with pytest.raises(RigError, match=words):
            EngineSpec.parse(bad)


def test_channels_last_engine_matches_plain(unet):
    x, b, t, z = torch.randn(2, 3, 64, 64), torch.randn(2, 9, 64, 64), torch.tensor([3, 700]), torch.randn(2, 64)
    reference = torch_engine(copy.deepcopy(unet))(x, t, b, z)
    assert relative_error(torch_engine(copy.deepcopy(unet), channels_last=True)(x, t, b, z), reference) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; a CUDA GPU is present")
def test_cuda_graphs_and_trt_refuse_cpu_clearly(unet, tmp_path):
    with pytest.raises(RigError, match="CUDA graphs need"):
        torch_engine(copy.deepcopy(unet), cuda_graphs=True)
    with pytest.raises(RigError, match="cannot run here"):
        make_engine("torch-graphs", copy.deepcopy(unet), tmp_path, 64)
    with pytest.raises(RigError, match="cannot run here"):
        make_engine("trt", copy.deepcopy(unet), tmp_path, 64)


# ---------------------------------------------------------------- torch.compile and the default engine

needs_compiler = pytest.mark.skipif(
    missing_compiler(cuda=False) is not None, reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++)"
)


def cpu_inputs(batch: int, size: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, b = torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, 9, size, size, generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g), b, torch.randn(batch, 64, generator=g)


def test_auto_is_compiled_bf16_on_cuda_and_eager_fp32_on_a_cpu():
    assert default_engine("cuda") == resolve_engine("auto", "cuda:0") == "torch-bf16-cl-compile"
    assert default_engine("cpu") == resolve_engine("AUTO", "cpu") == "torch"
    assert resolve_engine("onnx", "cuda") == "onnx"
    assert EngineSpec.parse("torch-fp32-unfused").unfused and not EngineSpec.parse("torch-fp32").unfused


@needs_compiler
def test_compiled_fp32_engine_agrees_with_the_eager_unet(unet, tmp_path):
    """torch.compile on the CPU (inductor's C++ backend) within 1e-5 of the paper's eager fp32 UNet (the
    unfused passes), saying when it compiles, with its code cached where it is told."""
    said: list[str] = []
    cache = tmp_path / "inductor"
    engine = make_engine(
        "torch-fp32-compile", copy.deepcopy(unet), tmp_path, 64, "cpu", compile_cache=cache, on_status=said.append
    )
    reference = torch_engine(copy.deepcopy(unet), fused=False)
    args = cpu_inputs(2)
    assert relative_error(engine(*args), reference(*args)) < 1e-5
    assert said[0].startswith("compiling the UNet for batch 2") and said[1].startswith("compiled the UNet")
    engine(*cpu_inputs(2, seed=2))  # the same shape: compiled already, nothing said
    assert len(said) == 2 and any(p.is_file() for p in cache.rglob("*"))


def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch, unet, tmp_path):
    """A compiled default engine whose compilation fails says so and runs eager; named explicitly, the
    failure is raised (a benchmark row must never measure eager under a compiled name)."""

    def broken(module, **options):
        def fail(*args):
            raise RuntimeError("inductor failed today")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(engines, "default_engine", lambda device: "torch-fp32-compile")
    monkeypatch.setattr(engines, "missing_compiler", lambda cuda: None)
    said: list[str] = []
    engine = make_engine("auto", copy.deepcopy(unet), tmp_path, 64, "cpu", on_status=said.append)
    args = cpu_inputs(2)
    assert relative_error(engine(*args), torch_engine(copy.deepcopy(unet))(*args)) < 1e-6
    assert "torch.compile failed" in said[-1] and "inductor failed today" in said[-1] and "eager" in said[-1]
    explicit = make_engine("torch-fp32-compile", copy.deepcopy(unet), tmp_path, 64, "cpu")
    with pytest.raises(RuntimeError, match="inductor failed today"):
        explicit(*args)


def test_compile_without_a_compiler_is_refused_clearly(monkeypatch, unet, tmp_path):
    monkeypatch.setattr(engines.shutil, "which", lambda name: None)
    with pytest.raises(RigError, match="C\\+\\+ compiler"):
        make_engine("torch-fp32-compile", copy.deepcopy(unet), tmp_path, 64, "cpu")
    assert make_engine("auto", copy.deepcopy(unet), tmp_path, 64, "cpu") is not None  # eager needs none


# ---------------------------------------------------------------- TensorRT absent


@pytest.mark.parametrize("how", ["env", "sys.modules"])
def test_export_trt_without_tensorrt_says_what_to_install(how, monkeypatch, tmp_path):
    if how == "env":
        monkeypatch.setenv("RIG_NO_TENSORRT", "1")
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # what an uninstalled package looks like to import
    assert missing_tensorrt() is not None
    result = rig(tmp_path, "export-trt", "nobody")  # refused before looking for the person
    assert result.exit_code == 2, result.output
    assert "pip install 'rig[gpu]'" in result.stderr and "Traceback" not in result.output


def recording_tensorrt(built: list[dict]):
    """A stand-in for the ``tensorrt`` module with the builder calls rig makes, recording them, so the
    profile, precision flag and engine cache can be checked without a GPU (the real build runs in
    test_trt_matches_torch_per_step on one)."""
    import importlib.machinery
    import types

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = "10.0.test"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    record: dict = {}

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            record["onnx"] = path
            return True

    class Config:
        def set_flag(self, flag):
            record.setdefault("flags", set()).add(flag)

        def add_optimization_profile(self, profile):
            record["profile"] = profile

    class Profile(dict):
        def set_shape(self, name, low, opt, high):
            self[name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            record["network_flags"] = flags

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            built.append(dict(record))
            return b"plan %d" % len(built)

    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


def test_trt_build_profile_precision_and_cache(monkeypatch, unet, tmp_path):
    import engines.tensorrt as module
    from engines.tensorrt import trt_artifact

    built: list[dict] = []
    monkeypatch.setitem(sys.modules, "tensorrt", recording_tensorrt(built))
    gpu = {"tensorrt": "10.0.test", "gpu": "Test GPU", "capability": "9.0", "cuda": "12.4"}
    monkeypatch.setattr(module, "device_key", lambda: dict(gpu))
    plan = trt_artifact(unet, tmp_path, 64, fp16=True, max_batch=8)
    assert plan.read_bytes() == b"plan 1" and len(built) == 1
    record = built[0]
    assert record["flags"] == {"FP16"} and record["network_flags"] == 0  # fp16 kernels chosen by TensorRT
    shapes = {"x_t": (3, 64, 64), "t": (), "buffers": (9, 64, 64), "latent": (64,)}
    assert record["profile"] == {n: ((1, *r), (8, *r), (8, *r)) for n, r in shapes.items()}
    graph = onnx.load(record["onnx"]).graph  # built from the fp32 export
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert trt_artifact(unet, tmp_path, 64, fp16=True, max_batch=8) == plan and len(built) == 1  # cached
    info = json.loads((plan.parent / "engine.json").read_text())
    assert info["kind"] == "tensorrt" and info["gpu"] == "Test GPU" and info["precision"] == "fp16"
    gpu["gpu"] = "Another GPU"  # an engine is never used on a GPU it was not built for
    other = trt_artifact(unet, tmp_path, 64, fp16=True, max_batch=8)
    assert other != plan and len(built) == 2
    assert trt_artifact(unet, tmp_path, 64, fp16=True, max_batch=16) not in (plan, other) and len(built) == 3


# ---------------------------------------------------------------- artifacts in the store


def rig(home, *args, env=None):
    return runner.invoke(app, ["--home", str(home), *args], env={"COLUMNS": "200", **(env or {})})


@pytest.fixture
def person_home(tmp_path, unet):
    """A store with one person (no photos needed) and a tiny saved model."""
    store = Store(tmp_path / "home")
    store.save(Manifest(name="astro", created=now_iso(), updated=now_iso(), align_size=256))
    model = DiffusionRig(preset("tiny"))
    model.denoisingUNet.load_state_dict(unet.state_dict())
    save_model(store.person_dir("astro") / "model", model, {})
    return store


def listed(home) -> list[dict]:
    result = rig(home, "engines", "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_engines_list_and_remove_round_trip(person_home):
    home = person_home.root
    assert listed(home) == []
    assert rig(home, "export-onnx", "astro").exit_code == 0
    (first,) = listed(home)
    assert (first["person"], first["kind"], first["precision"], first["state"]) == ("astro", "onnx", "fp32", "current")
    assert first["bytes"] == sum(f.stat().st_size for f in (home / "people/astro/engines" / first["key"]).iterdir())
    table = rig(home, "engines", "list")
    assert first["key"] in table.stdout and "current" in table.stdout

    model, _ = load_model(person_home.person_dir("astro") / "model")  # retrain: new weights
    with torch.no_grad():
        model.denoisingUNet.out[2].bias += 0.5
    save_model(person_home.person_dir("astro") / "model", model, {})
    (old,) = listed(home)
    assert old["state"] == "stale" and "weights changed" in old["reason"]
    assert rig(home, "export-onnx", "astro", "--fp16").exit_code == 0
    rows = {r["key"]: r for r in listed(home)}
    assert len(rows) == 2 and rows[first["key"]]["state"] == "stale"
    (new,) = [r for k, r in rows.items() if k != first["key"]]
    assert new["state"] == "current" and new["precision"] == "fp16"
    assert onnx.load(home / "people/astro/engines" / new["key"] / "model.onnx").graph.input[
        0
    ].type.tensor_type.elem_type == (onnx.TensorProto.FLOAT16)
    assert load_model(person_home.person_dir("astro") / "model")[0].denoisingUNet.out[2].bias.dtype == torch.float32

    bad = rig(home, "engines", "remove", "astro", "nokey")
    assert bad.exit_code == 2 and "has no engine 'nokey'" in bad.stderr
    assert rig(home, "engines", "remove", "astro").exit_code == 2  # neither KEY nor --all
    assert rig(home, "engines", "remove", "astro", first["key"]).exit_code == 0
    assert [r["key"] for r in listed(home)] == [new["key"]]
    assert not (home / "people/astro/engines" / first["key"]).exists()
    assert rig(home, "engines", "remove", "astro", "--all").exit_code == 0
    assert listed(home) == [] and not list(home.glob(".trash-*"))


def test_a_stale_artifact_is_rebuilt_not_used(unet, tmp_path):
    path = artifact(unet, tmp_path, 64)
    info_path = path.parent / "engine.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "onnxruntime": "0.0.1"}))  # as if exported by another version
    path.write_bytes(b"not an onnx model")
    rebuilt = artifact(unet, tmp_path, 64)
    assert rebuilt == path and json.loads(info_path.read_text())["onnxruntime"] == info["onnxruntime"]
    x, t, b, z = torch.randn(1, 3, 64, 64), torch.tensor([5]), torch.randn(1, 9, 64, 64), torch.randn(1, 64)
    fresh = onnx_engine(rebuilt, providers=[])
    assert relative_error(fresh(x, t, b, z), torch_engine(copy.deepcopy(unet))(x, t, b, z)) < 1e-4


# ---------------------------------------------------------------- rig bench


@pytest.mark.parametrize("command", [["export-trt"], ["engines", "list"], ["engines", "remove"], ["bench"]])
def test_help(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Usage" in result.stdout
    if command == ["bench"]:
        assert "measured in the run" in result.stdout and "--train-steps" in result.stdout


def test_bench_runs_on_cpu_and_its_json_is_consistent(tmp_path):
    out = tmp_path / "bench.json"
    engines = "onnx,onnx-fp16,torch-fp32,torch-fp16,trt"  # onnx first: its reference edit is made untimed
    result = rig(tmp_path, "bench", "--preset", "tiny", "--device", "cpu", "--batch", "2", "--steps", "3",
                 "--engines", engines, "--repeats", "1", "--calls", "2", "--json", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    base, runs = report["baseline"], report["runs"]
    assert (base["engine"], base["batch"], base["steps"], base["unet_calls_per_edit"]) == (
        "torch-fp32-unfused", 1, 20, 39,
    )  # fmt: skip
    assert base["strict_fp32"] and not any(r["strict_fp32"] for r in runs)
    assert [(r["engine"], r["batch"]) for r in runs] == [(e, 2) for e in engines.split(",")]
    gflops = model_info(preset("tiny"))["unet_gflops_per_call"]
    assert report["unet_gflops_per_call"] == pytest.approx(gflops)
    for row in [base, *[r for r in runs if r["status"] == "ok"]]:
        assert row["unet_calls_per_edit"] == 2 * row["steps"] - 1  # sampling + inversion
        assert row["edits_per_s"] == pytest.approx(row["batch"] / row["seconds_per_batch"])
        assert row["seconds_per_edit"] * row["edits_per_s"] == pytest.approx(1.0)
        assert row["speedup"] == pytest.approx(row["edits_per_s"] / base["edits_per_s"])
        assert row["achieved_tflops"] == pytest.approx(gflops * row["batch"] / row["ms_per_unet_call"])
        assert row["peak_memory_mb"] > 50  # RSS holds torch
        assert row["peak_precision"] == "fp32" and row["peak_tflops"] == report["peak_tflops"]["fp32"] > 0
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_tflops"] / row["peak_tflops"])
        # the edit loop and the separately timed UNet calls measure the same work, in the same units (a
        # unit slip is a factor of 1000; a CPU shared with other jobs can stretch one timed call 10x)
        per_call = row["seconds_per_batch"] / row["unet_calls_per_edit"] * 1000
        assert 0.02 < per_call / row["ms_per_unet_call"] < 50
    ok = {r["engine"]: r for r in runs if r["status"] == "ok"}
    assert set(ok) == {"torch-fp32", "onnx", "onnx-fp16"}
    # accuracy against the paper's computation (fp32 eager unfused): the baseline's edit is its own
    # reference; at batch 2 the reference edit was made apart (before torch-fp32 ran), and the fused
    # torch-fp32 engine comes within fp32 rounding of it; ONNX fp32 agrees to 1e-4; fp16 really differs
    assert base["edit_is_reference"] and not ok["torch-fp32"]["edit_is_reference"]
    assert base["call_error_vs_fp32"] == 0.0 and base["edit_psnr_vs_fp32"] >= 100
    assert ok["torch-fp32"]["call_error_vs_fp32"] < 1e-5 and ok["torch-fp32"]["edit_psnr_vs_fp32"] > 80
    assert ok["onnx"]["call_error_vs_fp32"] < 1e-4 and ok["onnx"]["edit_psnr_vs_fp32"] > 60
    assert 1e-5 < ok["onnx-fp16"]["call_error_vs_fp32"] < 1e-2
    assert ok["onnx-fp16"]["edit_psnr_vs_fp32"] < ok["onnx"]["edit_psnr_vs_fp32"]
    skipped = {r["engine"]: r["reason"] for r in runs if r["status"] == "skipped"}
    assert set(skipped) == {"torch-fp16", "trt"} and "CUDA GPU" in skipped["torch-fp16"]
    assert "TensorRT" in skipped["trt"] or "tensorrt" in skipped["trt"]
    assert "skipped" in result.stdout and "baseline torch-fp32" in result.stdout


def test_bench_measures_a_saved_model(tmp_path):
    """--model: the saved model's own config (here 32 px, not the default preset's 256) and weights."""
    import dataclasses

    from engines.onnx import weights_hash

    torch.manual_seed(3)
    model = DiffusionRig(dataclasses.replace(preset("tiny"), image_size=32))
    with torch.no_grad():
        for p in model.parameters():  # weights the bench's own random ones could not be
            p.add_(0.01)
    save_model(tmp_path / "model", model, {})
    out = tmp_path / "bench.json"
    result = rig(tmp_path, "bench", "--model", str(tmp_path / "model"), "--device", "cpu", "--batch", "1",
                 "--steps", "2", "--engines", "onnx", "--repeats", "1", "--calls", "1", "--json", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["preset"] is None and report["model"] == str(tmp_path / "model")
    assert report["image_size"] == 32 and report["weights_hash"] == weights_hash(model.denoisingUNet)
    assert report["weights"] == f"saved model {report['weights_hash']}"
    assert report["runs"][0]["status"] == "ok" and report["runs"][0]["call_error_vs_fp32"] < 1e-4
    missing = rig(tmp_path, "bench", "--model", str(tmp_path / "nothing"), "--device", "cpu")
    assert missing.exit_code == 2 and "no model there" in missing.stderr


def test_the_strict_baseline_is_timed_apart_from_the_same_engine_with_tf32(monkeypatch, tmp_path):
    """The baseline runs in strict fp32 (TF32 off) and its per-call time is its own: the same engine at
    the same batch under torch's defaults (TF32 convolutions on a GPU) is timed again, not given the
    baseline's figure (before, the time was kept by engine and batch, so both rows showed one number)."""
    import engines.bench as bench

    seen: list[tuple[int, bool]] = []  # (batch, TF32 allowed) of each UNet call
    real = bench.make_engine

    def spying(*args, **kwargs):
        engine = real(*args, **kwargs)

        def call(x, t, b, z):
            seen.append((len(x), torch.backends.cudnn.allow_tf32))
            return engine(x, t, b, z)

        return call

    monkeypatch.setattr(bench, "make_engine", spying)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default
    plan = bench.BenchPlan(
        preset="tiny", batches=[1], steps=[2], engines=["torch-fp32-unfused"], device="cpu", repeats=1, calls=3
    )
    report = bench.run_bench(plan)
    base, (run,) = report["baseline"], report["runs"]
    assert base["status"] == run["status"] == "ok" and base["engine"] == run["engine"] and base["batch"] == 1
    assert base["strict_fp32"] and not run["strict_fp32"]
    strict, default = seen.count((1, False)), seen.count((1, True))
    # baseline: 1 warm-up + 3 timed calls + a 20-step edit (39 calls); the run: 1 + 3 + a 2-step edit (3)
    assert (strict, default) == (1 + 3 + 39, 1 + 3 + 3)
    assert base["ms_per_unet_call"] != run["ms_per_unet_call"]  # two measurements, not one shown twice
    assert torch.backends.cudnn.allow_tf32  # restored


def test_bench_trains_the_preset_model_for_its_accuracy(tmp_path):
    """--train-steps: the preset's model trained by the training loop on blobs, its accuracy measured on
    held-out blobs; the loss fell while it trained."""
    out = tmp_path / "bench.json"
    result = rig(tmp_path, "bench", "--preset", "tiny", "--train-steps", "40", "--device", "cpu", "--batch", "2",
                 "--steps", "3", "--engines", "torch-fp32", "--repeats", "1", "--calls", "1",
                 "--json", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["weights"] == "trained 40 steps on synthetic blobs" and report["train_steps"] == 40
    assert report["train_loss"]["last"] < report["train_loss"]["first"]
    (run,) = report["runs"]
    assert run["status"] == "ok" and run["call_error_vs_fp32"] < 1e-5
    both = rig(tmp_path, "bench", "--train-steps", "5", "--model", str(tmp_path), "--device", "cpu")
    assert both.exit_code == 2 and "give one of them" in both.stderr


def test_peak_is_measured_per_precision():
    from engines.bench import measure_peak, peak_precision

    fp32 = measure_peak("cpu", "fp32", size=256, repeats=2)
    assert 1e-4 < fp32 < 100  # TFLOP/s of a CPU
    for spec in ("torch-bf16", "torch", "onnx-fp16"):  # a CPU's rows all against its fp32 rate
        assert peak_precision(EngineSpec.parse(spec), "cpu", strict=False) == "fp32"


def test_strict_fp32_restores_the_tf32_flags():
    from engines.bench import strict_fp32

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    try:
        with pytest.raises(ValueError), strict_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise ValueError
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_bench_refuses_bad_lists(tmp_path):
    for args, words in ((["--batch", "1,x"], "--batch"), (["--engines", "torch,tpu"], "unknown engine")):
        result = rig(tmp_path, "bench", "--preset", "tiny", "--device", "cpu", *args)
        assert result.exit_code == 2 and words in result.stderr


# ---------------------------------------------------------------- on a GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_trt = pytest.mark.skipif(
    not torch.cuda.is_available() or missing_tensorrt() is not None, reason="needs a CUDA GPU / TensorRT"
)


def gpu_inputs(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, b = torch.randn(batch, 3, 64, 64, generator=g), torch.rand(batch, 9, 64, 64, generator=g)
    t, z = torch.randint(0, 1000, (batch,), generator=g), torch.randn(batch, 64, generator=g)
    return [v.cuda() for v in (x, t, b, z)]


@needs_cuda
@pytest.mark.parametrize(
    "spec", ["torch-fp16", "torch-bf16-cl", "torch-graphs", "torch-fp16-graphs", "torch-bf16-cl-compile"]
)
def test_torch_gpu_engines_per_step(unet, spec, tmp_path):
    reference = make_engine("torch", copy.deepcopy(unet), tmp_path, 64, "cuda")
    engine = make_engine(spec, copy.deepcopy(unet), tmp_path, 64, "cuda")
    for batch in (1, 3, 3, 5):  # graphs: capture, replay, capture another shape
        args = gpu_inputs(batch, seed=batch)
        limit = 6e-2 if "bf16" in spec else 1e-2  # bf16 rounds 8x coarser than fp16
        assert relative_error(engine(*args), reference(*args)) < limit


@needs_trt
def test_trt_matches_torch_per_step(unet, tmp_path):
    from engines.tensorrt import trt_artifact, trt_engine

    plan = trt_artifact(copy.deepcopy(unet), tmp_path, 64, fp16=True, max_batch=4)
    assert trt_artifact(copy.deepcopy(unet), tmp_path, 64, fp16=True, max_batch=4) == plan  # cached
    engine = trt_engine(plan)
    reference = make_engine("torch", copy.deepcopy(unet), tmp_path, 64, "cuda")
    for batch in (1, 3, 6):  # 6 > max_batch: runs in chunks
        args = gpu_inputs(batch, seed=batch)
        eps = engine(*args)
        assert eps.is_cuda and eps.dtype == torch.float32
        assert relative_error(eps, reference(*args)) < 1e-2


@needs_cuda
def test_onnx_on_the_gpu_provider_matches_torch(unet, exported, tmp_path):
    engine = onnx_engine(exported)
    if "CUDAExecutionProvider" not in engine.providers:
        pytest.skip("needs onnxruntime-gpu (CUDA execution provider) on a CUDA GPU")
    reference = make_engine("torch", copy.deepcopy(unet), tmp_path, 64, "cuda")
    for batch in (1, 4):
        args = gpu_inputs(batch, seed=batch)
        eps = engine(*args)
        assert eps.is_cuda and relative_error(eps, reference(*args)) < 1e-2  # GPU providers may use TF32


def train_on_blobs(device: str, size: int, steps: int):
    """A tiny model trained on smooth, face-sized blobs whose buffers say where the blob is: enough
    training that its DDIM round trip is a real image, not noise (an untrained model's edit would not
    test the precision of anything). Returns the model, 4 images and their buffers."""
    from rigcli.diffusion.schedule import Diffusion

    torch.manual_seed(0)
    model = DiffusionRig(preset("tiny")).to(device).train()
    diffusion, optimizer = Diffusion(), torch.optim.Adam(model.parameters(), lr=3e-4)
    grid = torch.linspace(-1, 1, size, device=device)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    for _ in range(steps):
        centre = torch.rand(8, 2, 1, 1, device=device) - 0.5
        blob = torch.exp(-((xx - centre[:, :1]) ** 2 + (yy - centre[:, 1:]) ** 2) * 4)  # (8, 1, size, size)
        images = (blob * torch.rand(8, 3, 1, 1, device=device) * 2 - 1).clamp(-1, 1)
        buffers = blob.expand(-1, 9, -1, -1)
        t = torch.randint(0, 1000, (8,), device=device)
        noise = torch.randn_like(images)
        eps = model(diffusion.q_sample(images, t, noise), t, buffers, images=images)
        loss = diffusion.loss(eps, noise, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), images[:4], buffers[:4]


def edit_psnr_against_fp32(trained, engine, device: str) -> float:
    """PSNR of a whole 20-step edit (inversion with the buffers, sampling with them mirrored) by
    ``engine`` against the same edit by the fp32 torch UNet: same inputs, no randomness."""
    from rigcli.diffusion.schedule import Diffusion, ddim_invert, ddim_sample, ddim_timesteps
    from rigcli.image.metrics import psnr

    model, images, buffers = trained

    def edit(denoise):
        with torch.no_grad():
            latent = model.encode(images)
            ts, diffusion = ddim_timesteps(20), Diffusion()
            x_t = ddim_invert(lambda x, t: denoise(x, t, buffers, latent), images, diffusion, ts)
            return ddim_sample(lambda x, t: denoise(x, t, buffers.flip(-1), latent), x_t, diffusion, ts, clip=False)

    reference = edit(torch_engine(copy.deepcopy(model.denoisingUNet).to(device)))
    return psnr(edit(engine).float().cpu(), reference.float().cpu(), value_range=(-1, 1))


@pytest.fixture(scope="module")
def trained_cpu_model():
    """On the CPU at 32 px (the UNet is convolutional; torch's CPU fp16 convolution is slow)."""
    return train_on_blobs("cpu", 32, 150)


@pytest.mark.parametrize("spec", ["onnx-fp16", "torch-fp16"])
def test_fp16_edit_on_the_cpu_stays_within_35_db_of_fp32(trained_cpu_model, spec, tmp_path):
    unet = copy.deepcopy(trained_cpu_model[0].denoisingUNet)
    if spec == "torch-fp16":
        engine = torch_engine(unet, torch.float16)  # make_engine refuses it on a CPU: slow, not wrong
    else:
        engine = make_engine(spec, unet, tmp_path, 32, "cpu")
    assert edit_psnr_against_fp32(trained_cpu_model, engine, "cpu") >= 35.0


@needs_compiler
def test_compiled_bf16_edit_of_a_trained_model_stays_within_35_db_of_fp32(trained_cpu_model, tmp_path):
    """torch-bf16-cl-compile, the CUDA default, run here by inductor's C++ backend: one call within 1e-2
    of the fp32 eager UNet on the trained model's own inputs, a whole 20-step edit within 35 dB."""
    model, images, buffers = trained_cpu_model
    engine = make_engine("torch-bf16-cl-compile", copy.deepcopy(model.denoisingUNet), tmp_path, 32, "cpu",
                         compile_cache=tmp_path / "inductor")  # fmt: skip
    reference = torch_engine(copy.deepcopy(model.denoisingUNet), fused=False)
    with torch.no_grad():
        latent = model.encode(images)
    g = torch.Generator().manual_seed(0)
    for t in (torch.full((4,), 50), torch.full((4,), 900)):  # measured 7.8e-3 and 9.5e-3 (eager bf16: 1.1e-2)
        noisy = images + 0.3 * torch.randn(images.shape, generator=g)  # what the edit's calls see: noisy images
        error = relative_error(engine(noisy, t, buffers, latent), reference(noisy, t, buffers, latent))
        assert 1e-6 < error < 1e-2
    assert edit_psnr_against_fp32(trained_cpu_model, engine, "cpu") >= 35.0


@pytest.fixture(scope="module")
def trained_gpu_model():
    return train_on_blobs("cuda", 64, 300)


@needs_cuda
@pytest.mark.parametrize("spec", ["torch-fp16", "trt"])
def test_fp16_edit_stays_within_35_db_of_fp32(trained_gpu_model, spec, tmp_path):
    if spec == "trt" and missing_tensorrt():
        pytest.skip("needs a CUDA GPU / TensorRT")
    engine = make_engine(spec, copy.deepcopy(trained_gpu_model[0].denoisingUNet), tmp_path, 64, "cuda")
    assert edit_psnr_against_fp32(trained_gpu_model, engine, "cuda") >= 35.0
