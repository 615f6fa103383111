"""rig eval's outputs: metrics.json and a self-contained report.html."""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from rigcli import RigError, __version__
from rigcli.evaluate.metrics import DECIMALS, SAME_PERSON
from rigcli.evaluate.suite import KINDS, METRICS, SUITE_DOC, Evaluation, ModelSpec, eval_photos, evaluate, parse_spec
from rigcli.files import atomic_write_bytes, atomic_write_json, now_iso
from rigcli.image.grid import grid
from rigcli.image.photo import encode_png


def metrics_json(evaluation: Evaluation) -> dict:
    """The evaluation as JSON: settings, photos (with their files' SHA-256), per model every edit's
    metrics and the per-type summary."""

    return {
        "person": evaluation.person,
        "created": now_iso(),
        "rig_version": __version__,
        "seed": evaluation.seed,
        "suite": SUITE_DOC,
        "same_person_threshold": SAME_PERSON,
        "rounding": f"every number is round(value, {DECIMALS}); report.html shows the same values",
        "photos": [
            {"label": p.label, "path": str(p.path), "sha256": hashlib.sha256(p.path.read_bytes()).hexdigest()}
            for p in evaluation.photos
        ],
        "models": [
            {
                "label": run.spec.label,
                "model": run.spec.model,
                "folder": str(run.folder),
                "steps": run.spec.steps,
                "engine": run.spec.engine,
                "strength": run.spec.strength,
                "image_size": run.size,
                "summary": run.summary(),
                "measurement_floor": run.floor,
                "edits": [{"photo": e.photo, "kind": e.kind, "label": e.label, **e.metrics} for e in run.edits],
            }
            for run in evaluation.runs
        ],
    }


def format_value(value) -> str:
    """How a summary value is shown: the stored number as is (already rounded), '-' when not applicable."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{DECIMALS}f}"


def _png_uri(image: np.ndarray) -> str:

    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; background: #fff; }
th, td { border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; text-align: right; }
th { background: #eee; } td.name { text-align: left; }
img.row { height: 128px; image-rendering: pixelated; }
p.note { color: #555; font-size: 13px; max-width: 960px; }
"""


def report_html(evaluation: Evaluation, doc: dict) -> str:
    """A self-contained page: the summary table (the values of ``doc``, metrics.json) and per edit
    type a grid, one row per photo and edit: input | edited shaded, normal | output of each model."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>rig eval {esc(evaluation.person)}</title><style>{CSS}</style></head><body>",
        f"<h1>rig eval: {esc(evaluation.person)}</h1>",
        f"<p class='note'>{len(evaluation.photos)} photo(s): {esc(', '.join(p.label for p in evaluation.photos))}; "
        f"seed {evaluation.seed}; models: {esc(', '.join(r.spec.label for r in evaluation.runs))}. "
        f"id dist: euclidean distance of dlib's face descriptors of input and output (same person below "
        f"{SAME_PERSON}); same person: the share within it. PSNR and SSIM against the input at the model's "
        "size (for a model run at a strength s=S, rig edit's method: at the crop size, on the aligned crop of the "
        "photo-size output), inside the face (reconstruction) and outside it (background). Edit errors: the "
        "output fitted again, against what was asked (light: the angle between the directions of the single "
        "lights that best explain each shading on the asked face's skin). Detail kept: the variance of the "
        "Laplacian of the face at the photo's size, output over input (the paper's edit composed in by the "
        "plain blend). "
        f"Numbers are rounded to {DECIMALS} decimals, as in metrics.json.</p>",
        "<h2>Summary</h2><table id='summary'><thead><tr><th>model</th><th>edit type</th><th data-key='count'>n</th>",
    ]
    parts += [f"<th data-key='{key}'>{esc(title)}</th>" for key, title in METRICS]
    parts.append("</tr></thead><tbody>")
    for model in doc["models"]:
        for kind, row in model["summary"].items():
            parts.append(f"<tr data-model='{esc(model['label'])}' data-kind='{kind}'>")
            parts.append(f"<td class='name'>{esc(model['label'])}</td><td class='name'>{kind}</td>")
            parts.append(f"<td data-key='count'>{row['count']}</td>")
            parts += [f"<td data-key='{key}'>{format_value(row[key])}</td>" for key, _ in METRICS]
            parts.append("</tr>")
    parts.append("</tbody></table>")
    for model in doc["models"]:
        floor = model["measurement_floor"]
        parts.append(
            f"<p class='note'>Measurement floor of {esc(model['label'])}: the inputs themselves, fitted again the "
            f"same way, are off by {floor['light_error_deg']} deg in light, {floor['blendshape_error']} in "
            f"blendshape weight and {floor['yaw_error_deg']} deg in yaw.</p>"
        )
    first = evaluation.runs[0]
    size = first.size
    for kind in KINDS:
        rows = [i for i, e in enumerate(first.edits) if e.kind == kind]
        if not rows:
            continue
        outputs = " | ".join(f"output {r.spec.label}" for r in evaluation.runs)
        parts.append(f"<h2>{kind}</h2><p class='note'>{esc(SUITE_DOC[kind])}. Columns: input | edited shaded | "
                     f"edited normal | {esc(outputs)}.</p>")  # fmt: skip
        parts.append("<table class='grid'><thead><tr><th>photo</th><th>edit</th><th>images</th>")
        parts += [f"<th>id dist {esc(r.spec.label)}</th>" for r in evaluation.runs]
        parts.append("</tr></thead><tbody>")
        for i in rows:
            edit = first.edits[i]
            tiles = list(edit.tiles)
            for run in evaluation.runs[1:]:
                other = run.edits[i].tiles[-1]
                if other.shape[0] != size:
                    other = np.asarray(Image.fromarray(other).resize((size, size), Image.Resampling.BICUBIC))
                tiles.append(other)
            parts.append(
                f"<tr><td class='name'>{esc(edit.photo)}</td><td class='name'>{esc(edit.label)}</td>"
                f"<td><img class='row' alt='{esc(edit.label)}' src='{_png_uri(grid(tiles, len(tiles), pad=2))}'></td>"
            )
            parts += [f"<td>{format_value(run.edits[i].metrics['identity_euclidean'])}</td>" for run in evaluation.runs]
            parts.append("</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "".join(parts)


def output_paths(out_dir: Path) -> tuple[Path, Path]:
    return Path(out_dir) / "metrics.json", Path(out_dir) / "report.html"


def write_outputs(evaluation: Evaluation, out_dir: Path) -> tuple[Path, Path, dict]:
    """Write metrics.json and report.html (each atomically); return their paths and the JSON."""

    metrics_path, report_path = output_paths(out_dir)
    doc = metrics_json(evaluation)
    atomic_write_json(metrics_path, doc)
    atomic_write_bytes(report_path, report_html(evaluation, doc).encode("utf-8"))
    return metrics_path, report_path, doc


@dataclass
class EvalRun:
    """What ``run_eval`` measured and wrote."""

    photos: int
    metrics_path: Path
    report_path: Path
    doc: dict


def run_eval(
    store,
    name: str,
    out_dir: Path | None = None,
    *,
    holdout: int | None = None,
    photos: Sequence[Path] | None = None,
    model: str = "person",
    steps: int = 20,
    engine: str = "torch",
    compare: str | None = None,
    strengths: Sequence[float] | None = None,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> EvalRun:
    """``rig eval``: choose the photos, run the suite on the model (and ``compare``'s, a
    ``MODEL[:STEPS][@ENGINE]`` spec), write metrics.json and report.html into ``out_dir``
    (default ``eval-NAME``); the outputs are checked before any work. ``strengths``: each model is
    run by ``rig edit``'s method at the photo's size once per strength, instead of by the paper's
    edit at the model's size."""
    for value in strengths or ():
        if not 0 <= value <= 1:
            raise RigError(f"--strength {value:g}: give values between 0 and 1")
    target = Path(out_dir or f"eval-{name}")
    existing = [str(p) for p in output_paths(target) if p.exists()]
    if existing and not force:
        raise RigError(f"output exists (pass --force to overwrite): {', '.join(existing)}")
    chosen = eval_photos(store, name, holdout, photos)
    first = ModelSpec(model, steps, engine)
    specs = [first] if compare is None else [first, parse_spec(compare, first)]
    if strengths:
        specs = [replace(spec, strength=float(value)) for spec in specs for value in strengths]
    evaluation = evaluate(store, name, chosen, specs, seed=seed, device=device, on_progress=on_progress)
    metrics_path, report_path, doc = write_outputs(evaluation, target)
    return EvalRun(len(chosen), metrics_path, report_path, doc)
