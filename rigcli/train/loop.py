"""The training loop: data, forward, P2-weighted loss, backward, clip, step, EMA, checkpoint, resume."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save

from rigcli import RigError
from rigcli.diffusion.schedule import Diffusion, ddim_sample, ddim_timesteps
from rigcli.diffusion.unet import DiffusionRig
from rigcli.files import atomic_write_bytes, atomic_write_json, now_iso
from rigcli.image.grid import grid, to_uint8
from rigcli.image.photo import encode_png
from rigcli.train.data import TrainingData


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
    # autocast on CUDA: "fp16" (with loss scaling), "bf16" (stage 1's default; Ampere or newer) or "fp32"
    precision: str = "fp16"
    augment_ratio: float = 0.0  # share of samples drawn from a photo's augmented copies (TrainingData.groups)
    flip: bool = False  # mirror half the samples, with their buffers (normals' x negated)
    self_share: float = 0.25  # with album pairs: share of samples that pair a photo with itself (a no-op)


PRECISIONS = ("fp16", "bf16", "fp32")


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step on one process."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63)


def draw_rows(data: TrainingData, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """A batch's row indices: uniform over the rows; with augmentation, uniform over the album's
    photos, each sample taken from one of that photo's copies with chance ``cfg.augment_ratio``; with
    album pairs, a photo with itself with chance ``cfg.self_share``, else a pair of two photos."""
    if data.pairs is not None:
        cross, own = data.cross, len(data) - data.cross
        pick = torch.rand(cfg.batch, generator=generator)
        row = torch.randint(0, 2**62, (cfg.batch,), generator=generator)
        if cross == 0:
            return cross + row % own
        return torch.where(pick < cfg.self_share, cross + row % own, row % cross)
    if data.groups is None or cfg.augment_ratio <= 0:
        return torch.randint(0, len(data), (cfg.batch,), generator=generator)
    photo = torch.randint(0, data.photos, (cfg.batch,), generator=generator)
    take = torch.rand(cfg.batch, generator=generator) < cfg.augment_ratio
    copy = torch.randint(1, data.copies + 1, (cfg.batch,), generator=generator)
    return torch.where(take, data.groups[photo, copy], data.groups[photo, 0])


def training_batch(data, cfg: TrainConfig, step: int, rank: int, world: int, generator: torch.Generator, device: str):
    """One process's batch at ``step``: from an album (``TrainingData``, rows drawn with ``generator``)
    or streamed from shards (``ShardData``: rows a function of the step, rank and world size)."""
    if not isinstance(data, TrainingData):
        return data.batch(step, cfg.batch, cfg.seed, rank, world, device)
    x0, cond = data.take(draw_rows(data, cfg, generator))
    if cfg.flip:
        x0, cond = flip_pairs(x0, cond, torch.rand(cfg.batch, generator=generator) < 0.5)
    return x0.to(device), cond.to(device)


def flip_pairs(images: torch.Tensor, buffers: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the chosen samples left to right, images and buffers alike; a mirrored face's normals
    point the other way in x (buffer channel 3), as its render would."""
    images, buffers = images.clone(), buffers.clone()
    images[which] = images[which].flip(-1)
    mirrored = buffers[which].flip(-1)
    mirrored[:, 3] = -mirrored[:, 3]
    buffers[which] = mirrored
    return images, buffers


def save_checkpoint(folder: Path, model, ema, optimizer, step: int, meta: dict) -> None:
    """Write weights + EMA + Adam state, then the JSON that points at them."""
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
        saved = {**asdict(TrainConfig()), "precision": "fp16", **info.get("train", {})}  # runs saved before a field
        if info.get("data_hash") != data.data_hash or saved != asdict(cfg):
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
    if cfg.precision not in PRECISIONS:
        raise RigError(f"precision {cfg.precision!r}: one of {', '.join(PRECISIONS)}")
    use_amp = device.startswith("cuda") and cfg.precision != "fp32"
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.precision == "fp16")  # bf16 needs no scaling
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    world = dist.get_world_size() if distributed else 1
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
            x0, cond = training_batch(data, cfg, step, rank, world, generator, device)
            t = torch.randint(0, diffusion.steps, (cfg.batch,), generator=generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            x_t = diffusion.q_sample(x0, t, noise)
            with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
                source = net.latent_images(x0, cond)
                if cfg.freeze_encoder:
                    with torch.no_grad():
                        latent = net.encode(source)
                    eps = model(x_t, t, cond, latent)
                else:
                    eps = model(x_t, t, cond, images=source)
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
def write_preview(model: DiffusionRig, data, path: Path, device: str, count: int = 4) -> None:
    """A grid: the first ``count`` training samples over samples drawn for their buffers (10 DDIM steps);
    with album pairs, the first pairs' targets over what the model draws from their physical edits."""

    if isinstance(data, TrainingData):
        count = min(count, len(data))
        x0, cond = (v.to(device) for v in data.take(torch.arange(count)))
    else:
        x0, cond = data.preview(count, device)
        count = len(x0)
    latent = model.encode(model.latent_images(x0, cond))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    samples = ddim_sample(lambda x, t: model(x, t, cond, latent), noise, Diffusion(), ddim_timesteps(10))
    atomic_write_bytes(path, encode_png(grid([*to_uint8(x0), *to_uint8(samples)], columns=count)))
