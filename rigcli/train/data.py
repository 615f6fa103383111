"""Training pairs: photos with the buffers their fits render (one person, or a folder of many), and
for a model conditioned on the physical edit (issue 27) the album's own pairs: photo A physically
edited toward photo B's fitted parameters as the condition, the real B as the target."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save

from rigcli import RigError
from rigcli.enroll import crop_landmarks, read_face, read_fit
from rigcli.face.flame import flame_texture_id
from rigcli.face.params import FaceFit, fit_from_json, rescale_fit
from rigcli.face.registry import face_model_name, load_face_model
from rigcli.files import atomic_write_bytes
from rigcli.image.photo import read_photo
from rigcli.render.buffers import (
    LIGHT_DIRECTIONS,
    light_direction,
    light_for,
    rasterize_fit,
    render_buffers,
    sh_shading,
    skin_mask,
)
from rigcli.render.compose import physical_edit

RENDER_VERSION = 1  # bump when the buffers a fit renders to change


@dataclass
class TrainingData:
    """Clean images in [-1, 1] (N, 3, S, S) and their buffers (N, 9, S, S); with augmentation,
    ``groups`` (P, 1 + K): per album photo its own row index, then those of its K augmented copies.

    With album pairs (``pair_edits``), a sample is a pair: ``pairs`` (M, 3) the rows of its source, the
    photo whose parameters it was edited toward, and its target; ``edits`` (M, 4, S, S) uint8 the
    physical edit and the mask of what its source never showed (0..255); the pairs that edit come
    first, then each photo with itself (source, via and target the same)."""

    images: torch.Tensor
    buffers: torch.Tensor
    data_hash: str
    face_model_id: str
    groups: torch.Tensor | None = None
    pairs: torch.Tensor | None = None
    edits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0] if self.pairs is None else self.pairs.shape[0])

    @property
    def photos(self) -> int:
        """Album photos (the augmented copies and pairs not counted)."""
        if self.pairs is not None:
            return int(self.images.shape[0])
        return len(self) if self.groups is None else int(self.groups.shape[0])

    @property
    def cross(self) -> int:
        """Pairs made by an edit (the first rows of ``pairs``); the rest pair a photo with itself."""
        return 0 if self.pairs is None else int((self.pairs != self.pairs[:, :1]).any(1).sum())

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``rows``: (images in [-1, 1] (B, 3, S, S), their conditioning (B, C, S, S)), for
        pairs the target's image and its buffers followed by the edit's crop in [-1, 1] and mask in [0, 1]."""
        if self.pairs is None:
            return self.images[rows], self.buffers[rows]
        target = self.pairs[rows, 2]
        edit = self.edits[rows].float()
        condition = torch.cat([self.buffers[target], edit[:, :3] / 127.5 - 1.0, edit[:, 3:] / 255.0], 1)
        return self.images[target], condition

    @property
    def copies(self) -> int:
        """Augmented copies per album photo."""
        return 0 if self.groups is None else int(self.groups.shape[1]) - 1


@dataclass(frozen=True)
class Augment:
    """Copies of each album photo made by the physical edit (``render.compose``), each with the
    buffers of the parameters it was made with: the same face under other lights, with small
    expression changes and head turns, which the album alone never shows the model."""

    copies: int = 4
    seed: int = 0
    max_yaw: float = 6.0  # degrees: head turns the warp stays faithful within (issue 15)
    max_pitch: float = 4.0
    expression: float = 0.35  # chance that each of smile, jaw open, blink, brow raise changes in a copy
    # the space the copies' shading ratio multiplies (render.compose.RELIGHT_SPACES): sRGB, the space
    # the light is fitted in (fit_light models sRGB values as albedo x shading), so a copy fitted again
    # shows the light it was made with. In that model the linear-light shading is the fitted one to the
    # power 2.2, and multiplying linear light by its ratio is multiplying the sRGB values by the fitted
    # ratio: this is the physical relight of the fit (benchmarks/bench_relight_space.py).
    relight: str = "srgb"
    max_light_move: float = 180.0  # degrees a copy's light may turn from its photo's (a side further is pulled in)

    def key(self) -> list:
        return [AUGMENT_VERSION, self.copies, self.seed, self.max_yaw, self.max_pitch, self.expression,
                self.relight, self.max_light_move]  # fmt: skip


AUGMENT_VERSION = 4  # bump when the copies an Augment makes change (3: unseen surface inpainted; 4: skin-only relight)
AUGMENT_LIGHTS = ("left", "right", "top", "bottom", "front")  # rig edit --light's sides, drawn half the time
AUGMENT_EXPRESSIONS = {  # blendshapes moved together, and the largest weight drawn
    ("mouthSmile_L", "mouthSmile_R"): 0.8,
    ("jawOpen",): 0.4,
    ("eyeBlink_L", "eyeBlink_R"): 1.0,
    ("browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R"): 0.7,
}


def turn_at_most(start: np.ndarray, target: np.ndarray, degrees: float) -> tuple[float, float, float]:
    """``target`` as given, or the unit direction ``degrees`` from ``start`` on the great circle towards
    it when ``target`` is further: a photo lit from one side cannot show light from the other."""
    unit_start, unit_target = start / np.linalg.norm(start), target / np.linalg.norm(target)
    cos = float(np.clip(unit_start @ unit_target, -1, 1))
    if math.degrees(math.acos(cos)) <= degrees:  # as given: the copies of an unbounded Augment stay as they were
        return tuple(float(v) for v in target)
    across = unit_target - cos * unit_start
    if np.linalg.norm(across) < 1e-9:  # exactly opposite: turn about any axis
        across = np.cross(unit_start, [0.0, 1.0, 0.0] if abs(unit_start[1]) < 0.9 else [1.0, 0.0, 0.0])
    across /= np.linalg.norm(across)
    angle = math.radians(degrees)
    return tuple(float(v) for v in math.cos(angle) * unit_start + math.sin(angle) * across)


def augmented_fit(
    fit: FaceFit, names: Sequence[str], normals: torch.Tensor, rng: np.random.Generator, augment: Augment
) -> FaceFit:
    """One copy's parameters from a photo's (batch-1) fit: a new light (a named side half the time,
    else within 60 deg of the photo's own, its strength drawn in [0.7, 1.3] of the default and the
    face's mean shading kept), some blendshapes set anew, a small head turn."""
    out = fit.select([0])
    # the photo's light as its skin shows it (the first-order terms alone are ill-posed on a face)
    own = light_direction(fit.light[0], normals).double().numpy()
    if rng.random() < 0.5:
        direction = LIGHT_DIRECTIONS[AUGMENT_LIGHTS[int(rng.integers(len(AUGMENT_LIGHTS)))]]
    else:
        yaw = math.atan2(own[0], own[2]) + math.radians(rng.uniform(-60, 60))
        pitch = math.asin(float(np.clip(own[1], -1, 1))) + math.radians(rng.uniform(-40, 40))
        pitch = float(np.clip(pitch, -1.2, 1.2))
        direction = (math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch))
    direction = turn_at_most(own, np.asarray(direction), augment.max_light_move)
    light = light_for(direction, 0.8 * rng.uniform(0.7, 1.3), 0.35, None)
    mean = sh_shading(normals[None].float(), light[None])[0].mean() if len(normals) else torch.tensor(1.0)
    own_mean = sh_shading(normals[None].float(), fit.light[:1].float())[0].mean() if len(normals) else mean
    out.light = (light * (own_mean / mean.clamp_min(1e-3)))[None].to(fit.light.dtype)
    expression = out.expression.clone()
    for shapes, top in AUGMENT_EXPRESSIONS.items():
        present = [names.index(n) for n in shapes if n in names]
        if present and rng.random() < augment.expression:
            expression[0, present] = float(rng.uniform(0, top))
    out.expression = expression
    out.yaw = fit.yaw + math.radians(rng.uniform(-1, 1) * augment.max_yaw)
    out.pitch = fit.pitch + math.radians(rng.uniform(-1, 1) * augment.max_pitch)
    return out


PAIR_VERSION = 2  # bump when the pairs pair_edits makes change
MAX_PAIR_TURN = 20.0  # degrees of yaw or pitch between A and B beyond which the warp means little: pair left out


def person_data(
    store,
    name: str,
    size: int,
    exclude: Sequence[str] = (),
    augment: Augment | None = None,
    on_copy=None,
    pairs: bool = False,
) -> TrainingData:
    """A person's training photos (crop + buffers at ``size``), rendered once and cached; photos
    whose ids are in ``exclude`` (held out for evaluation) are left out. With ``augment``, each
    photo's augmented copies follow the album's rows (``TrainingData.groups``), cached with them.
    With ``pairs``, the album's pairs and their physical edits (``pair_edits``), cached with them;
    ``on_copy`` hears the progress of either.

    The cache key covers the fit, the face model, the renderer, the augmentation and, for a DECA fit,
    the texture space its albedo comes from, so a refit, a new face model or a texture import makes a
    new cache.
    """
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
        parts.append(flame_texture_id(store))
    if augment is not None and augment.copies > 0:
        if pairs:
            raise RigError("--augment with album pairs is not supported: the pairs already show the model edits")
        parts.append(augment.key())
    else:
        augment = None
    if pairs:
        parts.append(["pairs", PAIR_VERSION, MAX_PAIR_TURN])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    cache = store.person_dir(name) / "cache" / f"train-{size}-{key}.safetensors"
    count = len(records)
    groups = None
    if augment is not None:  # row of photo i: i; of its copy j: count + i * copies + j
        copies = torch.arange(count * augment.copies).reshape(count, augment.copies) + count
        groups = torch.cat([torch.arange(count)[:, None], copies], 1)
    if cache.is_file():
        tensors = load_file(cache)
        return TrainingData(
            tensors["images"], tensors["buffers"], key, fit_doc["model_id"], groups, tensors.get("pairs"),
            tensors.get("edits"),
        )  # fmt: skip
    images, buffers = render_training_pairs(store, name, records, fit_doc, size)
    extra = {}
    if pairs:
        extra["pairs"], extra["edits"] = pair_edits(store, name, records, fit_doc, size, on_copy)
    if augment is not None:
        more, more_buffers, _ = augmented_pairs(store, name, records, fit_doc, size, augment, on_copy)
        images, buffers = torch.cat([images, more]), torch.cat([buffers, more_buffers])
    for old in cache.parent.glob(f"train-{size}-*.safetensors"):
        old.unlink()
    # train on the tensors exactly as a later run reads them back: same values and the same (contiguous)
    # layout, since a permuted layout sends the convolutions down another path (other rounding), and a
    # run killed after building the cache must resume bit for bit
    images, buffers = images.contiguous(), buffers.contiguous()
    atomic_write_bytes(cache, save({"images": images, "buffers": buffers, **extra}))
    return TrainingData(images, buffers, key, fit_doc["model_id"], groups, extra.get("pairs"), extra.get("edits"))


def blob_data(count: int, size: int, seed: int = 0) -> TrainingData:
    """Synthetic training pairs for measuring engines, not faces: smooth blobs of random colour and
    place, each with buffers that say where its blob is (its mask in all 9 channels). A model trained
    on them for a few hundred steps makes real DDIM round trips instead of noise, which is what a
    precision's accuracy must be measured on (``rig bench --train-steps``); no photos, fits or renders."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centre = torch.rand(count, 2, 1, 1, generator=g) - 0.5
    blob = torch.exp(-((xx - centre[:, :1]) ** 2 + (yy - centre[:, 1:]) ** 2) * 4)  # (N, 1, S, S)
    images = (blob * torch.rand(count, 3, 1, 1, generator=g) * 2 - 1).clamp(-1, 1)
    buffers = blob.expand(-1, 9, -1, -1).contiguous()
    return TrainingData(images.contiguous(), buffers, f"blobs-{count}-{size}-{seed}", "none (synthetic blobs)")


def render_training_pairs(store, name: str, records, fit_doc: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops resized to ``size`` in [-1, 1], and the fit's buffers rendered at ``size``."""
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


def augmented_pairs(
    store, name: str, records, fit_doc: dict, size: int, augment: Augment, on_copy=None
) -> tuple[torch.Tensor, torch.Tensor, list[FaceFit]]:
    """``augment.copies`` copies of each record's aligned crop, made by the physical edit in the crop's
    own frame, resized to ``size`` in [-1, 1], with the buffers their parameters render at ``size``
    and those parameters (crop frame); ordered photo by photo. Each photo's copies are drawn from
    (``augment.seed``, its id), so they do not change when other photos come or go."""
    model = load_face_model(store, face_model_name(fit_doc))
    crop_size = fit_doc["crop_size"]
    fit = fit_from_json([fit_doc["photos"][r.id] for r in records], fit_doc["identity"], model.expression_names)
    geometry = rasterize_fit(model, fit, crop_size)
    skin = skin_mask(model, geometry)
    images, fits = [], []
    for i, record in enumerate(records):
        crop = read_photo(store.person_dir(name) / record.aligned).pixels
        one = fit.select([i])
        rng = np.random.default_rng([augment.seed, int(record.id[:8], 16)])
        for _ in range(augment.copies):
            edited = augmented_fit(one, model.expression_names, geometry.normals[i][skin[i]], rng, augment)
            picture = physical_edit(crop, np.eye(2, 3), crop_size, model, one, edited, relight=augment.relight).image
            if picture.shape[0] != size:
                picture = np.asarray(Image.fromarray(picture).resize((size, size), Image.Resampling.BOX))
            images.append(picture)
            fits.append(edited)
            if on_copy:
                on_copy(len(fits), len(records) * augment.copies)
    if not fits:
        return torch.zeros(0, 3, size, size), torch.zeros(0, 9, size, size), []
    buffers = render_buffers(model, rescale_fit(FaceFit.cat(fits), crop_size, size), size)
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return tensor, buffers, fits


def pair_turn(fit: FaceFit, a: int, b: int) -> float:
    """Degrees the head turns from photo ``a`` to photo ``b`` of a fit: the larger of yaw and pitch."""
    return math.degrees(max(abs(float(fit.yaw[a] - fit.yaw[b])), abs(float(fit.pitch[a] - fit.pitch[b]))))


def pair_edits(store, name: str, records, fit_doc: dict, size: int, on_pair=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The album's pairs as (pairs (M, 3) long: source, via, target rows; edits (M, 4, size, size) uint8).

    For every ordered pair of photos A != B whose head turns at most MAX_PAIR_TURN between them: A's
    aligned crop physically edited toward B's fitted parameters (``render.compose.physical_edit``, as
    ``rig edit`` makes it with --pose-from B --expression-from B --light-from B), with B as the target
    (A, B, B); and that edit edited back toward A's parameters, with A as the target (A, B, A): a
    physical edit of the photo whose real result is known, so the model learns to keep what the edit
    shows and mend what it breaks, not to draw the album's photos. Then every photo with itself
    (A, A, A: its crop, nothing filled), so a no-op stays a no-op. The mask channel: where the (last)
    edit filled surface its input never showed. Deterministic, in the records' order."""
    model = load_face_model(store, face_model_name(fit_doc))
    crop_size = fit_doc["crop_size"]
    fit = fit_from_json([fit_doc["photos"][r.id] for r in records], fit_doc["identity"], model.expression_names)
    count = len(records)
    chosen = [(a, b) for a in range(count) for b in range(count) if a != b and pair_turn(fit, a, b) <= MAX_PAIR_TURN]
    crops = [read_photo(store.person_dir(name) / r.aligned).pixels for r in records]
    points = [crop_landmarks(read_face(store, name, r)) for r in records]

    def shrink(image: np.ndarray, fill: np.ndarray) -> np.ndarray:  # -> (4, size, size), area-averaged
        unseen = np.clip(np.round(fill * 255), 0, 255).astype(np.uint8)
        image = np.concatenate([image, unseen[..., None]], -1)
        if image.shape[0] != size:
            channels = [Image.fromarray(image[..., c]).resize((size, size), Image.Resampling.BOX) for c in range(4)]
            image = np.stack([np.asarray(c) for c in channels], -1)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def edit(image: np.ndarray, a: int, b: int, landmarks: np.ndarray):
        return physical_edit(
            image, np.eye(2, 3), crop_size, model, fit.select([a]), fit.select([b]), landmarks=landmarks
        )

    direct, back = [], []
    for i, (a, b) in enumerate(chosen):
        there = edit(crops[a], a, b, points[a])
        direct.append(shrink(there.image, there.fill))
        again = edit(there.image, b, a, points[b])  # the edit now shows B's pose: B's landmarks stand in
        back.append(shrink(again.image, np.maximum(again.fill, there.fill)))
        if on_pair:
            on_pair(i + 1, len(chosen))
    own = [shrink(crops[a], np.zeros(crops[a].shape[:2], np.float32)) for a in range(count)]
    rows = [(a, b, b) for a, b in chosen] + [(a, b, a) for a, b in chosen] + [(a, a, a) for a in range(count)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3), torch.from_numpy(np.stack(direct + back + own))
