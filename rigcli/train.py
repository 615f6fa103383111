"""Training: the loop (stage 1 generic, stage 2 personal), its data, checkpoints and resume.

The loop is the algorithm, top to bottom: sample a batch, noise it at random timesteps, encode the
clean photos to the global latent, predict the noise, P2-weighted loss, backward, clip the gradient
to 1.0, Adam step, EMA update; every N steps a JSONL log line, a preview grid and a checkpoint.
Stage 2 (``freeze_encoder``) trains only the UNet, as the paper does.

Checkpoints are a safetensors file (model, EMA, Adam state) and a JSON file written after it (step,
config, face model id, data hash, the weights file's hash). Each step's randomness is drawn from a
generator seeded by (seed, process rank, step), so a run that is killed resumes from the last pair
and ends with the same weights as a run that was never interrupted, and stage 1 scales out with
DistributedDataParallel (``torchrun``) without any state to hand between processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rigcli import RigError
from rigcli.diffusion import Diffusion, ddim_sample, ddim_timesteps
from rigcli.store import atomic_write_bytes, atomic_write_json, file_sha256, now_iso
from rigcli.unet import DiffusionRig, ModelConfig

RENDER_VERSION = 1  # bump when the buffers a fit renders to change


@dataclass
class TrainConfig:
    """How to train (the paper's stage 2: lr 1e-5, batch 4, 5,000 steps, encoder frozen)."""

    steps: int = 5000
    batch: int = 4
    lr: float = 1e-5
    seed: int = 0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    freeze_encoder: bool = True
    log_every: int = 10
    checkpoint_every: int = 250
    preview_every: int = 500


@dataclass
class TrainingData:
    """Clean images in [-1, 1] (N, 3, S, S) and their buffers (N, 9, S, S)."""

    images: torch.Tensor
    buffers: torch.Tensor
    data_hash: str
    face_model_id: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ---------------------------------------------------------------- data


def person_data(store, name: str, size: int, exclude: Sequence[str] = ()) -> TrainingData:
    """A person's training photos (crop + buffers at ``size``), rendered once and cached; photos
    whose ids are in ``exclude`` (held out for evaluation) are left out.

    The cache key covers the fit, the face model, the renderer and, for a DECA fit, the texture space
    its albedo comes from, so a refit, a new face model or a texture import makes a new cache.
    """
    from safetensors.torch import load_file, save

    from rigcli.enroll import read_fit

    fit_doc = read_fit(store, name)
    if fit_doc is None:
        raise RigError(
            f"{name} has no 3D fit: install a face model (`rig assets download-ict`), then `rig refit {name}`"
        )
    manifest = store.load(name)
    records = [r for r in manifest.photos if r.train and r.id in fit_doc["photos"] and r.id not in exclude]
    if not records:
        raise RigError(f"{name} has no photos usable for training")
    parts = [fit_doc["model_id"], fit_doc["fitted"], [r.id for r in records], size, RENDER_VERSION]
    if any("texture_code" in p for p in fit_doc["photos"].values()):  # a DECA fit: albedo from the texture space
        from rigcli.flame import flame_texture_id

        parts.append(flame_texture_id(store))
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    cache = store.person_dir(name) / "cache" / f"train-{size}-{key}.safetensors"
    if cache.is_file():
        tensors = load_file(cache)
        return TrainingData(tensors["images"], tensors["buffers"], key, fit_doc["model_id"])
    images, buffers = render_training_pairs(store, name, records, fit_doc, size)
    for old in cache.parent.glob(f"train-{size}-*.safetensors"):
        old.unlink()
    atomic_write_bytes(cache, save({"images": images.contiguous(), "buffers": buffers.contiguous()}))
    return TrainingData(images, buffers, key, fit_doc["model_id"])


def render_training_pairs(store, name: str, records, fit_doc: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops resized to ``size`` in [-1, 1], and the fit's buffers rendered at ``size``."""
    from PIL import Image

    from rigcli.facemodel import face_model_name, load_face_model
    from rigcli.fit import fit_from_json, render_buffers
    from rigcli.photo import read_photo

    model = load_face_model(store, face_model_name(fit_doc))
    if model.model_id != fit_doc["model_id"]:
        raise RigError(f"{name} was fitted with another face model: run `rig refit {name}`")
    fit = fit_from_json([fit_doc["photos"][r.id] for r in records], fit_doc["identity"], model.expression_names)
    fit = rescale_fit(fit, fit_doc["crop_size"], size)
    buffers = render_buffers(model, fit, size)
    crops = []
    for record in records:
        crop = read_photo(store.person_dir(name) / record.aligned).pixels
        if crop.shape[0] != size:
            crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BOX))
        crops.append(crop)
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, buffers


def rescale_fit(fit, from_size: int, to_size: int):
    """The same fit for a crop resized from ``from_size`` to ``to_size`` pixels (pixel centres kept)."""
    factor = to_size / from_size
    out = copy.copy(fit)
    out.scale = fit.scale * factor
    out.translation = (fit.translation + 0.5) * factor - 0.5
    return out


# ---------------------------------------------------------------- checkpoints


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step on one process."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63)


def save_checkpoint(folder: Path, model, ema, optimizer, step: int, meta: dict) -> None:
    """Write weights + EMA + Adam state, then the JSON that points at them."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v)
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    weights = folder / f"step-{step:07d}.safetensors"
    atomic_write_bytes(weights, blob)
    info = {**meta, "step": step, "weights": weights.name, "sha256": hashlib.sha256(blob).hexdigest(),
            "param_groups": opt["param_groups"], "saved": now_iso()}  # fmt: skip
    atomic_write_json(folder / "latest.json", info)
    for old in folder.glob("step-*.safetensors"):
        if old.name != weights.name:
            old.unlink()


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The last complete checkpoint in ``folder`` (its JSON and tensors), or None."""
    from safetensors.torch import load

    pointer = folder / "latest.json"
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    blob = (folder / info["weights"]).read_bytes()
    if hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise RigError(f"checkpoint {folder / info['weights']} is damaged; delete {folder} to start over")
    return info, load(blob)


def _restore(tensors: dict, model, ema, optimizer, info: dict) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


# ---------------------------------------------------------------- the loop


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def train(
    model: DiffusionRig,
    data: TrainingData,
    cfg: TrainConfig,
    run_dir: Path,
    meta: dict,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> DiffusionRig:
    """Train ``model`` on ``data``; resumes from ``run_dir`` when it holds a checkpoint. Returns the EMA model.

    Under ``torchrun`` (torch.distributed initialized) each process trains on its own batches of
    ``cfg.batch`` with DistributedDataParallel; process 0 writes the log, previews and checkpoints.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    net = model.to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    if cfg.freeze_encoder:
        net.encoder.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    diffusion = Diffusion()
    meta = {**meta, "train": asdict(cfg), "data_hash": data.data_hash, "face_model_id": data.face_model_id}
    step = 0
    resumed = load_checkpoint(run_dir)
    if resumed is not None:
        info, tensors = resumed
        if info.get("data_hash") != data.data_hash or info.get("train") != asdict(cfg):
            raise RigError(
                f"{run_dir} holds a run with other data or settings; delete it or use the same settings to resume"
            )
        _restore(tensors, net, ema, optimizer, info)
        step = info["step"]
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            net, device_ids=[torch.device(device).index] if device.startswith("cuda") else None
        )
    else:
        model = net
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    images, buffers = data.images, data.buffers
    started, losses = time.monotonic(), []
    try:
        while step < cfg.steps:
            net.train()
            if cfg.freeze_encoder:
                net.encoder.eval()  # frozen: batch-norm statistics stay as the base model had them
            # this step's randomness depends only on (seed, rank, step): resumed and distributed runs
            # draw exactly what an uninterrupted single run would
            generator = torch.Generator().manual_seed(step_seed(cfg.seed, rank, step))
            torch.manual_seed(step_seed(cfg.seed, rank, step))  # dropout
            index = torch.randint(0, len(data), (cfg.batch,), generator=generator)
            x0, cond = images[index].to(device), buffers[index].to(device)
            t = torch.randint(0, diffusion.steps, (cfg.batch,), generator=generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            x_t = diffusion.q_sample(x0, t, noise)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                if cfg.freeze_encoder:
                    with torch.no_grad():
                        latent = net.encode(x0)
                    eps = model(x_t, t, cond, latent)
                else:
                    eps = model(x_t, t, cond, images=x0)
                loss = diffusion.loss(eps, noise, t)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            # EMA with warm-up: early on it follows the model, later it averages (a function of the step
            # alone, so a resumed run does exactly what an uninterrupted one does)
            _ema_update(ema, net, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            losses.append(loss.item())
            if on_step:
                on_step(step, losses[-1])
            if rank != 0:
                continue
            if step % cfg.log_every == 0 or step == cfg.steps:
                rate = len(losses) / max(time.monotonic() - started, 1e-9)
                line = {"step": step, "loss": float(np.mean(losses[-cfg.log_every :])), "steps_per_s": round(rate, 3)}
                if distributed:
                    line["processes"] = dist.get_world_size()
                log.write(json.dumps(line) + "\n")
                log.flush()
            if step % cfg.preview_every == 0 or step == cfg.steps:
                write_preview(ema, data, run_dir / f"preview-{step:07d}.png", device)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(run_dir, net, ema, optimizer, step, {**meta, "loss": losses[-1]})
    finally:
        if log is not None:
            log.close()
    return ema


@torch.no_grad()
def write_preview(model: DiffusionRig, data: TrainingData, path: Path, device: str, count: int = 4) -> None:
    """A grid: the first ``count`` training photos over samples drawn for their buffers (10 DDIM steps)."""
    from rigcli.photo import encode_png
    from rigcli.sheet import grid

    count = min(count, len(data))
    x0 = data.images[:count].to(device)
    cond = data.buffers[:count].to(device)
    latent = model.encode(x0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    samples = ddim_sample(lambda x, t: model(x, t, cond, latent), noise, Diffusion(), ddim_timesteps(10))
    to8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
    atomic_write_bytes(path, encode_png(grid([*to8(x0), *to8(samples)], columns=count)))


# ---------------------------------------------------------------- saved models


def save_model(folder: Path, model: DiffusionRig, info: dict) -> None:
    """A trained model: ``model.safetensors`` (weights) and ``model.json`` (config and provenance)."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    atomic_write_bytes(folder / "model.safetensors", blob)
    atomic_write_json(
        folder / "model.json",
        {**info, "config": model.cfg.to_json(), "sha256": hashlib.sha256(blob).hexdigest(), "saved": now_iso()},
    )


def load_model(folder: Path, device: str = "cpu") -> tuple[DiffusionRig, dict]:
    """A saved model and its JSON (refusing a damaged or mismatched weights file)."""
    from safetensors.torch import load

    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise RigError(f"no model in {folder} (model.json missing)")
    info = json.loads(meta_path.read_text())
    blob = (folder / "model.safetensors").read_bytes()
    if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
        raise RigError(f"the model weights in {folder} are damaged (hash mismatch)")
    model = DiffusionRig(ModelConfig.from_json(info["config"]))
    model.load_state_dict(load(blob))
    return model.to(device).eval(), info


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean().item() / 4.0
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# ---------------------------------------------------------------- stage 2 and the model registry


def model_info(cfg: ModelConfig, batch: int = 1) -> dict:
    """Parameters, FLOPs of one UNet call and training memory at ``batch``, counted on the meta device.

    Memory is what a training step holds: fp32 weights, gradients and Adam's two moments, plus every
    activation autograd saves for the backward pass (recorded by a saved-tensor hook).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from rigcli.unet import count_parameters

    size = cfg.image_size
    with torch.device("meta"):
        model = DiffusionRig(cfg)
        x = torch.randn(batch, 3, size, size)
        args = (
            x,
            torch.zeros(batch, dtype=torch.long),
            torch.randn(batch, 9, size, size),
            torch.randn(batch, cfg.latent_dim),
        )
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            model(*args).sum()
    unet = count_parameters(model.denoisingUNet)
    encoder = count_parameters(model.encoder)
    return {
        "unet_parameters": unet,
        "encoder_parameters": encoder,
        "unet_gflops_per_call": counter.get_total_flops() / 1e9 / batch,
        "batch": batch,
        "weights_mb": (unet + encoder) * 4 / 2**20,
        "training_state_mb": unet * 4 * 4 / 2**20,  # UNet weights, grads, Adam m and v (stage 2)
        "activations_mb": sum(saved) / 2**20,
    }


def registry_dir(store) -> Path:
    return store.root / "models"


def registered_models(store) -> dict[str, dict]:
    """Base models registered in the store, by name, with their model.json."""
    folder = registry_dir(store)
    if not folder.is_dir():
        return {}
    return {
        p.name: json.loads((p / "model.json").read_text())
        for p in sorted(folder.iterdir())
        if (p / "model.json").is_file() and not p.name.startswith(".")  # not an import being built
    }


def register_model(store, name: str, source: Path) -> dict:
    """Copy a saved model (a folder with model.safetensors + model.json) into the registry as ``name``."""
    from rigcli.store import check_name

    check_name(name)
    source = Path(source)
    model, info = load_model(source)  # validates the files before anything is copied
    del model
    target = registry_dir(store) / name
    if target.exists():
        raise RigError(f"a model named {name!r} is already registered; remove it or pick another name")
    store.ensure_writable()
    atomic_write_bytes(target / "model.safetensors", (source / "model.safetensors").read_bytes())
    atomic_write_json(target / "model.json", info)
    return info


def holdout_photos(store, name: str, count: int, seed: int = 0) -> list[str]:
    """``count`` of a person's trainable, fitted photos set aside for ``rig eval``, drawn with ``seed``
    (the same album and seed give the same photos)."""
    import random

    from rigcli.enroll import read_fit

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
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Stage 2: personalize a base model on ``name``'s photos (or train from scratch); returns model.json.

    ``holdout`` photos are drawn with ``seed``, kept out of training and listed in model.json
    (``holdout``) for ``rig eval``. Resumes an interrupted run with the same settings; ``restart``
    discards it.
    """
    import shutil

    from rigcli.unet import preset

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
    else:
        model, base_info = DiffusionRig(preset(preset_name or "tiny")), {}
        # from scratch there is no prior to preserve: stage 1's learning rate, encoder trained too
        cfg = TrainConfig(steps=steps or 5000, batch=batch or 4, lr=lr or 1e-4, seed=seed, freeze_encoder=False)
    cfg.checkpoint_every = checkpoint_every
    cfg.preview_every = max(checkpoint_every, cfg.steps // 10)
    with store.locked(name):  # held for the whole run: one training per person at a time
        held_out = holdout_photos(store, name, holdout, seed)
        data = person_data(store, name, model.cfg.image_size, exclude=held_out)
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
            "train": asdict(cfg),
            "trained": now_iso(),
        }
        save_model(store.person_dir(name) / "model", ema, info)
    return info


# ---------------------------------------------------------------- the paper's checkpoints

PAPER_FACE_MODEL_ID = "flame2020-deca"
"""What the paper's released models were trained on: FLAME 2020 fitted and rendered by DECA."""
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema", "net")  # where trainers nest a state dict
_KEY_PREFIXES = ("module.", "model.")  # DistributedDataParallel, Lightning


def check_base_buffers(base: str, base_info: dict, person: str, face_model_id: str) -> None:
    """Refuse a base model trained on buffers of another face model than the person's fit.

    The paper's released models (registered by ``import_diffusionrig``) saw FLAME 2020 buffers
    rendered by DECA; any FLAME fit here renders those buffers, whatever its files' hash.
    """
    base_id = base_info.get("face_model_id")
    if base_id == face_model_id:
        return
    if base_id == PAPER_FACE_MODEL_ID:
        if face_model_id.startswith("flame"):
            return
        raise RigError(
            f"base model {base!r} is the paper's, trained on FLAME buffers (rendered by DECA), but {person} is "
            f"fitted with {face_model_id}: fit {person} with FLAME first (`rig refit {person} --face-model flame`, "
            "see 'Using FLAME' in the README)"
        )
    raise RigError(
        f"base model {base!r} was trained on buffers of face model {base_id}, but "
        f"{person} is fitted with {face_model_id}: the buffers would not match"
    )


def read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a foreign PyTorch checkpoint, read with ``weights_only`` (no code in it runs).

    Unwraps what trainers put around a state dict: ``{'state_dict': ...}``, ``{'model': ...}``,
    ``{'ema': ...}`` and key prefixes ``module.`` (DistributedDataParallel) or ``model.`` (Lightning).
    """
    import pickle
    import re

    path = Path(path)
    if not path.is_file():
        raise RigError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch's zip format, or its legacy pickle
        raise RigError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise RigError(f"{path} is not a readable PyTorch checkpoint ({exc})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise RigError(
            f"refused {path}: it holds objects other than tensors{what}, which loading would have to run as code"
        ) from None
    except Exception as exc:  # a zip that is not torch's, a truncated file, text, ...
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise RigError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {first})") from None
    for _ in range(3):
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise RigError(f"{path} holds no state dict (a dict of named tensors) but {type(obj).__name__}")
    odd = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise RigError(f"{path}: {len(odd)} entries of its state dict are not named tensors: {', '.join(odd[:5])}")
    tensors = dict(obj)
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _listed(names: list[str], shown: int = 3) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_layout(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """RigError naming the missing, unexpected, wrongly shaped and wrongly typed entries, if any."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes, kinds = [], []
    for k, want in expected.items():
        got = tensors.get(k)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            shapes.append(f"{k} {list(got.shape)} (expected {list(want.shape)})")
        elif got.is_floating_point() != want.is_floating_point() or got.is_complex():
            kinds.append(
                f"{k} {str(got.dtype).removeprefix('torch.')} (expected {str(want.dtype).removeprefix('torch.')})"
            )
    parts = [
        f"{len(found)} {label} ({_listed(found)})"
        for label, found in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", shapes),
            ("wrong type", kinds),
        )
        if found
    ]
    if parts:
        raise RigError(f"{what}: " + "; ".join(parts))


def import_diffusionrig(store, path: Path, name: str, preset_name: str = "paper", force: bool = False) -> dict:
    """Register the paper's checkpoint (a plain state dict: ``denoisingUNet.*``, ``encoder.*``) as base ``name``.

    Read with ``weights_only``; strict: every tensor of the preset's network must be there with its
    shape, and nothing else. Floating tensors are stored as float32. Returns the model.json written.
    """
    import shutil
    import uuid

    from rigcli.store import check_name
    from rigcli.unet import preset

    check_name(name)
    cfg = preset(preset_name)
    target = registry_dir(store) / name
    if target.exists() and not force:
        raise RigError(f"a model named {name!r} is already registered; pass --force to replace it")
    path = Path(path)
    tensors = read_torch_state_dict(path)
    with torch.device("meta"):
        model = DiffusionRig(cfg)
    expected = model.state_dict()
    check_layout(tensors, expected, f"{path} does not match the paper's layout for preset {preset_name}")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()})
    model.load_state_dict(
        {k: tensors[k].to(want.dtype).contiguous() for k, want in expected.items()}, strict=True, assign=True
    )
    info = {
        "source": "diffusionrig",
        "source_file": path.name,
        "source_sha256": file_sha256(path),
        "source_dtypes": dtypes,
        "preset": preset_name,
        "face_model": "flame",
        "face_model_id": PAPER_FACE_MODEL_ID,
        "imported": now_iso(),
    }
    store.ensure_writable()
    # build the entry beside the registry and swap it in, so a failure leaves the old entry whole
    staging = registry_dir(store) / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        save_model(staging, model, info)
        if target.exists():
            trash = registry_dir(store) / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            target.rename(trash)
            staging.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return json.loads((target / "model.json").read_text())


def export_diffusionrig(
    store, out_path: Path, *, model_name: str | None = None, person: str | None = None, force: bool = False
) -> dict:
    """Write a registered base model or a person's fine-tuned model as the paper's plain state dict.

    The file loads in the paper's code with ``model.load_state_dict(th.load(path))`` once its network
    is built with the flags returned under ``arguments`` (none beyond the defaults for ``paper``).
    """
    import io

    from rigcli.store import check_name
    from rigcli.unet import paper_arguments

    if (model_name is None) == (person is None):
        raise RigError("give exactly one of --model NAME (a registered base model) or --person NAME")
    if model_name is not None:
        check_name(model_name)
        folder = registry_dir(store) / model_name
        if not (folder / "model.json").is_file():
            models = ", ".join(registered_models(store)) or "none"
            raise RigError(f"no base model named {model_name!r} (registered: {models})")
    else:
        store.require(person)
        folder = store.person_dir(person) / "model"
        if not (folder / "model.json").is_file():
            raise RigError(f"{person} has no fine-tuned model yet: run `rig finetune {person} --base NAME`")
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise RigError(f"{out_path} exists; pass --force to overwrite it")
    model, info = load_model(folder)
    arguments = paper_arguments(model.cfg)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # what the paper's trainer saves: the model's state_dict()
    atomic_write_bytes(out_path, buffer.getvalue())
    return {
        "path": str(out_path),
        "tensors": len(model.state_dict()),
        "arguments": arguments,
        "face_model_id": info.get("face_model_id"),
        "flame_buffers": str(info.get("face_model_id", "")).startswith("flame"),
    }


# ---------------------------------------------------------------- stage 1


def prepare_folder(
    store, data_dir: Path, cache_dir: Path, size: int, detector: str = "hog", chunk: int = 32, progress=None
) -> tuple[TrainingData, dict[str, int]]:
    """Detect, align and fit every face photo under ``data_dir`` into training pairs, in chunks.

    Resumable: finished chunks are kept (``chunk-NNNNN.safetensors``) and ``index.json`` records
    each file's outcome, so a rerun only processes what is new. Returns the data and the counts per
    outcome ("used", "no face", "unreadable", ...).
    """
    from safetensors.torch import load_file, save

    from rigcli.align import align_face, apply_affine, invert_affine
    from rigcli.detect import MIN_FACE_PX, FaceAnalyzer
    from rigcli.facemodel import load_face_model
    from rigcli.fit import fit_landmarks, fit_light, render_buffers
    from rigcli.photo import IMAGE_EXTENSIONS, PhotoError, read_photo

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise RigError(f"{data_dir} is not a folder of photos")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise RigError(f"{data_dir} holds no images")
    model = load_face_model(store)
    index_path = cache_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"files": {}, "chunks": []}
    if index.get("face_model_id", model.model_id) != model.model_id or index.get("size", size) != size:
        raise RigError(f"{cache_dir} was prepared with another face model or size; use another --out")
    index.update(face_model_id=model.model_id, size=size)
    todo = [p for p in files if p.relative_to(data_dir).as_posix() not in index["files"]]
    analyzer = FaceAnalyzer(detector)
    for start in range(0, len(todo), chunk):
        outcomes, crops, landmarks = {}, [], []
        for path in todo[start : start + chunk]:
            rel = path.relative_to(data_dir).as_posix()
            try:
                rgb = read_photo(path).pixels
            except PhotoError as exc:
                outcomes[rel] = exc.reason
                continue
            face = analyzer.find_face(rgb)
            if face is None or face.box.width < MIN_FACE_PX:
                outcomes[rel] = "no face" if face is None else "too small"
                continue
            aligned = align_face(rgb, face.landmarks, 256)
            crops.append(aligned.crop)
            landmarks.append(apply_affine(invert_affine(aligned.crop_to_photo), face.landmarks))
            outcomes[rel] = "used"
        if crops:
            lm = torch.tensor(np.stack(landmarks), dtype=torch.float32)
            fit = fit_landmarks(model, lm, shared_identity=False)
            pixels = torch.from_numpy(np.stack(crops)).float() / 255.0
            fit.light, fit.albedo = fit_light(model, fit, pixels)
            small = rescale_fit(fit, 256, size)
            chunk_buffers = render_buffers(model, small, size)
            chunk_images = (
                torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2), size=(size, size), mode="area") * 2 - 1
            )
            name = f"chunk-{len(index['chunks']):05d}.safetensors"
            atomic_write_bytes(cache_dir / name, save({"images": chunk_images.contiguous(), "buffers": chunk_buffers}))
            index["chunks"].append(name)
        index["files"].update(outcomes)
        atomic_write_json(index_path, index)  # after the chunk: a kill redoes at most one chunk
        if progress:
            progress(min(start + chunk, len(todo)), len(todo))
    if not index["chunks"]:
        raise RigError(f"no usable face photos in {data_dir}")
    parts = [load_file(cache_dir / name) for name in index["chunks"]]
    counts: dict[str, int] = {}
    for outcome in index["files"].values():
        counts[outcome] = counts.get(outcome, 0) + 1
    digest = hashlib.sha256(json.dumps([index["chunks"], sorted(index["files"].items())]).encode()).hexdigest()[:16]
    data = TrainingData(
        torch.cat([p["images"] for p in parts]), torch.cat([p["buffers"] for p in parts]), digest, model.model_id
    )
    return data, counts


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
    on_prepare=None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Stage 1: a generic prior on a folder of face photos. Under ``torchrun`` it trains with DDP
    (NCCL on GPUs, gloo on CPUs); process 0 prepares the data while the others wait."""
    import os

    import torch.distributed as dist

    from rigcli.unet import preset

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
        if rank == 0:
            prepare_folder(store, data_dir, out_dir / "data", cfg.image_size, detector, progress=on_prepare)
        if dist.is_initialized():
            dist.barrier()
        data, counts = prepare_folder(store, data_dir, out_dir / "data", cfg.image_size, detector)
        torch.manual_seed(seed)
        model = DiffusionRig(cfg)
        train_cfg = TrainConfig(
            steps=steps, batch=batch, lr=lr, seed=seed, freeze_encoder=False, checkpoint_every=checkpoint_every,
            preview_every=max(checkpoint_every, steps // 10),
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
            "photos": counts,
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
