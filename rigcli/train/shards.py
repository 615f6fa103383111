"""Stage 1's data at scale: a folder of photos prepared in parallel into shards, streamed back to train.

Preparation (``prepare_shards``) plans the photos, in sorted order, into shards of ``shard_size``
(``plan.json``); each process of a torchrun job (``rank`` of ``world``, on any node) prepares the
shards ``k`` with ``k % world == rank``, chunk by chunk on ``workers`` processes of its own. The chunks
are fixed by the plan, never by how many workers there are, so every way of running it writes the
same bytes. A shard holds the aligned crops as uint8 at the model's size and each photo's fitted
parameters, a few hundred numbers, not its buffers: the torch renderer draws those again on the
training device. A shard is written whole, its tensors and then its outcome JSON (each atomically),
so a killed preparation loses only the shards in flight, and a rerun plans only files no shard holds.

Training (``ShardData``) reads rows through memory maps, so memory does not grow with the data set:
one epoch is a permutation of all rows drawn from (seed, epoch), and step ``s`` of process ``r`` of
``w`` takes positions ``(s * w + r) * batch ...`` of the stream of epochs, a function of the step
alone, so each process sees its own part of every epoch and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save

from rigcli import RigError
from rigcli.estimate import LandmarkEstimator
from rigcli.face.params import FaceFit, rescale_fit
from rigcli.face.registry import load_face_model
from rigcli.files import atomic_write_bytes, atomic_write_json
from rigcli.image.align import align_face, apply_affine
from rigcli.image.detect import MIN_FACE_PX, FaceAnalyzer
from rigcli.image.photo import IMAGE_EXTENSIONS, PhotoError, read_photo
from rigcli.render.buffers import render_buffers

SHARD_FORMAT = 1  # bump when what a shard holds changes
CROP = 256  # the aligned crop the landmarks are fitted in (then resized to the model's size)
FIT_FIELDS = (
    "yaw",
    "pitch",
    "roll",
    "scale",
    "translation",
    "expression",
    "identity",
    "light",
    "albedo",
    "landmark_error",
)
MAX_LANDMARK_ERROR = 0.1  # a fit whose mean landmark error exceeds this share of the eye distance is left out
Progress = Callable[[int, int], None]


def list_photos(data_dir: Path, limit: int | None = None) -> list[str]:
    """The image files under ``data_dir`` (nested folders too, as FFHQ comes), as sorted relative
    POSIX paths; the first ``limit`` of them for a trial run."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise RigError(f"{data_dir} is not a folder of photos")
    files = sorted(
        p.relative_to(data_dir).as_posix()
        for p in data_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise RigError(f"{data_dir} holds no images")
    return files[:limit] if limit else files


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` is a finished preparation (what ``rig pretrain --data`` may also be given)."""
    return (Path(folder) / "index.json").is_file() and (Path(folder) / "plan.json").is_file()


def update_plan(out_dir: Path, files: Sequence[str], settings: dict, shard_size: int) -> dict:
    """Read ``plan.json`` (or start one) and append shards for the files no shard holds yet."""
    path = out_dir / "plan.json"
    plan = json.loads(path.read_text()) if path.is_file() else {**settings, "shard_size": shard_size, "shards": []}
    differ = [k for k, v in settings.items() if plan.get(k) != v]
    if differ:
        raise RigError(f"{out_dir} was prepared with another {', '.join(differ)}; use another --out")
    planned = {f for shard in plan["shards"] for f in shard}
    new = [f for f in files if f not in planned]
    size = plan["shard_size"]
    plan["shards"] += [new[i : i + size] for i in range(0, len(new), size)]
    if new or not path.is_file():
        atomic_write_json(path, plan)
    return plan


_WORKER: dict = {}


def _start_worker(store, detector: str) -> None:
    """A preparation worker: one thread (the same arithmetic in every process), its own detector."""
    torch.set_num_threads(1)
    _WORKER.update(model=load_face_model(store), analyzer=FaceAnalyzer(detector))


def prepare_chunk(job: tuple) -> tuple[int, dict[str, str], np.ndarray, dict[str, np.ndarray]]:
    """Detect, align and fit one chunk of photos: (shard, outcome per file, crops (n, S, S, 3) uint8 of
    the used files in order, their fitted parameters at size S)."""
    shard, data_dir, rels, size, max_error = job
    model, analyzer = _WORKER["model"], _WORKER["analyzer"]
    outcomes, used, crops, landmarks = {}, [], [], []
    for rel in rels:
        try:
            rgb = read_photo(Path(data_dir) / rel).pixels
        except PhotoError as exc:
            outcomes[rel] = exc.reason
            continue
        face = analyzer.find_face(rgb)
        if face is None or face.box.width < MIN_FACE_PX:
            outcomes[rel] = "no face" if face is None else "too small"
            continue
        aligned = align_face(rgb, face.landmarks, CROP)
        crops.append(aligned.crop)
        landmarks.append(apply_affine(aligned.photo_to_crop, face.landmarks))
        used.append(rel)
    params: dict[str, np.ndarray] = {}
    keep: list[int] = []
    if crops:
        fit = LandmarkEstimator().fit(model, np.stack(crops), np.stack(landmarks), shared_identity=False)
        for i, rel in enumerate(used):
            good = float(fit.landmark_error[i]) <= max_error
            outcomes[rel] = "used" if good else "poor fit"
            keep += [i] if good else []
        if keep:
            small = rescale_fit(fit.select(keep), CROP, size)
            params = {f: getattr(small, f).detach().float().numpy() for f in FIT_FIELDS}
    pixels = [crops[i] if size == CROP else np.asarray(Image.fromarray(crops[i]).resize((size, size), Image.BOX))
              for i in keep]  # fmt: skip
    outcomes = {rel: outcomes[rel] for rel in rels}  # the plan's order
    return shard, outcomes, np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8), params


def write_shard(out_dir: Path, k: int, outcomes: dict[str, str], crops: np.ndarray, params: dict) -> None:
    """Shard ``k``: its tensors, then the JSON of its files' outcomes that marks it finished."""
    tensors = {"crops": torch.from_numpy(np.ascontiguousarray(crops))}
    tensors.update({f"fit.{f}": torch.from_numpy(np.ascontiguousarray(v)) for f, v in params.items()})
    blob = save(tensors)
    atomic_write_bytes(out_dir / f"{shard_name(k)}.safetensors", blob)
    rows = sum(outcome == "used" for outcome in outcomes.values())
    doc = {"rows": rows, "files": outcomes, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_json(out_dir / f"{shard_name(k)}.json", doc)


def shard_done(out_dir: Path, k: int) -> bool:
    return (out_dir / f"{shard_name(k)}.json").is_file() and (out_dir / f"{shard_name(k)}.safetensors").is_file()


def prepare_shards(
    store,
    data_dir: Path,
    out_dir: Path,
    size: int,
    *,
    detector: str = "hog",
    workers: int | None = None,
    shard_size: int = 1000,
    chunk: int = 50,
    limit: int | None = None,
    max_landmark_error: float = MAX_LANDMARK_ERROR,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Progress | None = None,
) -> dict:
    """Prepare this process's shards of ``data_dir`` into ``out_dir`` (see the module docstring);
    every process of the job calls it, and ``barrier`` waits for all of them. Returns the summary
    (``summarize``) once every shard is done."""
    out_dir = Path(out_dir)
    if workers is not None and workers < 1:
        raise RigError(f"--workers {workers}: give at least 1")
    if shard_size < 1:
        raise RigError(f"--shard-size {shard_size}: give at least 1")

    def plan_them() -> None:
        files = list_photos(data_dir, limit)
        model_id = load_face_model(store).model_id
        settings = {"format": SHARD_FORMAT, "face_model_id": model_id, "size": size, "chunk": chunk,
                    "detector": detector, "max_landmark_error": max_landmark_error}  # fmt: skip
        update_plan(out_dir, files, settings, shard_size)

    on_rank_zero(plan_them, rank, barrier, out_dir)
    plan = json.loads((out_dir / "plan.json").read_text())
    mine = [k for k in range(len(plan["shards"])) if k % world == rank and not shard_done(out_dir, k)]
    jobs = [(k, str(data_dir), plan["shards"][k][i : i + plan["chunk"]], size, plan["max_landmark_error"])
            for k in mine for i in range(0, len(plan["shards"][k]), plan["chunk"])]  # fmt: skip
    total, done = sum(len(plan["shards"][k]) for k in mine), 0
    if progress:
        progress(0, total)
    if jobs:
        workers = min(workers or os.cpu_count() or 1, len(jobs))
        pending: dict[int, list] = {}
        if workers == 1:
            threads = torch.get_num_threads()
            _start_worker(store, detector)
            results = map(prepare_chunk, jobs)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (store, detector))
            results = pool.imap(prepare_chunk, jobs)  # in order: shard by shard, chunk by chunk
        try:
            for k, outcomes, crops, params in results:
                parts = pending.setdefault(k, [])
                parts.append((outcomes, crops, params))
                done += len(outcomes)
                if sum(len(p[0]) for p in parts) == len(plan["shards"][k]):
                    write_shard(out_dir, k, *join_chunks(pending.pop(k)))
                if progress:
                    progress(done, total)
        finally:
            if workers == 1:
                torch.set_num_threads(threads)
            else:
                pool.terminate()
    barrier()
    on_rank_zero(lambda: write_index(out_dir, plan), rank, barrier, out_dir)
    return summarize(out_dir)


def on_rank_zero(step: Callable[[], None], rank: int, barrier: Callable[[], None], out_dir: Path) -> None:
    """Run ``step`` on process 0 while the others wait; when it fails, every process fails with its
    message (left in ``out_dir``, which all nodes share) instead of waiting on process 0 forever."""
    failed = out_dir / ".failed"
    error = None
    if rank == 0:
        try:
            failed.unlink(missing_ok=True)
            step()
        except RigError as exc:
            error = exc
            atomic_write_bytes(failed, str(exc).encode())
    barrier()
    if error is not None:
        raise error
    if failed.is_file():
        raise RigError(f"process 0: {failed.read_text()}")


def join_chunks(parts: list) -> tuple[dict, np.ndarray, dict]:
    """One shard's outcomes, crops and parameters from its chunks, in order."""
    outcomes = {rel: o for p in parts for rel, o in p[0].items()}
    crops = np.concatenate([p[1] for p in parts])
    fields = [p[2] for p in parts if p[2]]
    params = {f: np.concatenate([p[f] for p in fields]) for f in FIT_FIELDS} if fields else {}
    return outcomes, crops, params


def write_index(out_dir: Path, plan: dict) -> None:
    """``index.json``: every file's outcome, and the shards that hold rows, in order."""
    files: dict[str, str] = {}
    shards = []
    for k in range(len(plan["shards"])):
        doc = json.loads((out_dir / f"{shard_name(k)}.json").read_text())
        files.update(doc["files"])
        if doc["rows"]:
            shards.append({"name": shard_name(k), "rows": doc["rows"], "bytes": doc["bytes"], "sha256": doc["sha256"]})
    if not shards:
        raise RigError(f"no usable face photos among the {len(files)} files prepared in {out_dir}")
    index = {key: plan[key] for key in ("format", "face_model_id", "size")}
    atomic_write_json(out_dir / "index.json", {**index, "shards": shards, "files": files})


def summarize(out_dir: Path) -> dict:
    """Counts per outcome, shards, rows and bytes on disk per photo of a finished preparation."""
    index = json.loads((Path(out_dir) / "index.json").read_text())
    counts: dict[str, int] = {}
    for outcome in index["files"].values():
        counts[outcome] = counts.get(outcome, 0) + 1
    rows = sum(s["rows"] for s in index["shards"])
    size = sum(s["bytes"] for s in index["shards"])
    return {"counts": counts, "shards": len(index["shards"]), "rows": rows, "bytes_per_photo": round(size / rows)}


class ShardData:
    """Prepared shards as training pairs: crops read through memory maps, buffers rendered from the
    fitted parameters on the training device as each batch arrives."""

    def __init__(self, folder: Path, face_model, device: str = "cpu") -> None:
        self.folder = Path(folder)
        if not is_prepared(self.folder):
            raise RigError(f"{self.folder} holds no finished preparation (index.json)")
        index = json.loads((self.folder / "index.json").read_text())
        if index.get("format") != SHARD_FORMAT:
            raise RigError(f"{self.folder} was prepared by another version of rig; prepare it again")
        if index["face_model_id"] != face_model.model_id:
            raise RigError(f"{self.folder} was fitted with face model {index['face_model_id']}, not the one installed")
        self.names = [s["name"] for s in index["shards"]]
        self.starts = np.cumsum([0] + [s["rows"] for s in index["shards"]])
        self.size = int(index["size"])
        self.face_model_id = index["face_model_id"]
        self.data_hash = hashlib.sha256(json.dumps([s["sha256"] for s in index["shards"]]).encode()).hexdigest()[:16]
        self.device = device
        self.face_model = face_model.to(device) if hasattr(face_model, "to") else face_model
        self._handles: dict[int, object] = {}
        self._order: tuple[int, int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The permutation of all rows that epoch ``epoch`` visits (across and within shards)."""
        if self._order is None or self._order[:2] != (seed, epoch):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._order = (seed, epoch, torch.randperm(len(self), generator=generator))
        return self._order[2]

    def rows(self, step: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The rows process ``rank`` of ``world`` trains on at ``step``: its own slice of the epochs' stream."""
        positions = (step * world + rank) * batch + np.arange(batch)
        return torch.stack([self.epoch_order(seed, int(p) // len(self))[int(p) % len(self)] for p in positions])

    def _handle(self, shard: int):
        if shard not in self._handles:
            if len(self._handles) >= 16:  # a few open maps at a time, whatever the number of shards
                self._handles.pop(next(iter(self._handles)))
            self._handles[shard] = safe_open(self.folder / f"{self.names[shard]}.safetensors", "pt")
        return self._handles[shard]

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, FaceFit]:
        """Rows' crops (B, S, S, 3) uint8 and their fitted parameters at the model's size."""
        crops, fields = [], {f: [] for f in FIT_FIELDS}
        for row in rows.tolist():
            shard = int(np.searchsorted(self.starts, row, side="right")) - 1
            local = row - int(self.starts[shard])
            handle = self._handle(shard)
            crops.append(handle.get_slice("crops")[local : local + 1])
            for f in FIT_FIELDS:
                fields[f].append(handle.get_slice(f"fit.{f}")[local : local + 1])
        fit = FaceFit(**{f: torch.cat(v) for f, v in fields.items()})
        return torch.cat(crops), fit

    def pairs(self, rows: torch.Tensor, device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pairs of ``rows`` on ``device``: images in [-1, 1] (B, 3, S, S) and their buffers
        (B, 9, S, S), rendered from the parameters there."""
        device = device or self.device
        crops, fit = self.read(rows)
        fit = FaceFit(**{f: getattr(fit, f).to(device) for f in FIT_FIELDS})
        images = crops.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
        return images, render_buffers(self.face_model, fit, self.size)

    def batch(self, step: int, batch: int, seed: int, rank: int = 0, world: int = 1, device: str | None = None):
        return self.pairs(self.rows(step, batch, seed, rank, world), device)

    def preview(self, count: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` rows, for the training previews."""
        return self.pairs(torch.arange(min(count, len(self))), device)


def synthetic_shards(
    out_dir: Path, face_model, fit: FaceFit, photos: int, size: int, shard_size: int = 1000, seed: int = 0
) -> None:
    """Shards of ``photos`` made-up rows (noise crops; ``fit``'s first photo, at ``size``, turned by up
    to 10 deg), written as a preparation writes them but with no photos behind them: for the tests and
    benchmarks of streaming."""
    rng = np.random.default_rng(seed)
    one = fit.select([0])
    files = [f"synthetic/{i:06d}.png" for i in range(photos)]
    plan = {"format": SHARD_FORMAT, "face_model_id": face_model.model_id, "size": size, "chunk": shard_size,
            "detector": "none", "max_landmark_error": MAX_LANDMARK_ERROR, "shard_size": shard_size,
            "shards": [files[i : i + shard_size] for i in range(0, photos, shard_size)]}  # fmt: skip
    for k, names in enumerate(plan["shards"]):
        n = len(names)
        params = {}
        for f in FIT_FIELDS:
            value = getattr(one, f).detach().float()
            value = value[None] if f == "identity" and value.dim() == 1 else value
            params[f] = value.expand(n, *value.shape[1:]).numpy().copy()
        params["yaw"] = params["yaw"] + np.radians(rng.uniform(-10, 10, n)).astype(np.float32)
        crops = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        write_shard(out_dir, k, dict.fromkeys(names, "used"), crops, params)
    atomic_write_json(out_dir / "plan.json", plan)
    write_index(out_dir, plan)
