"""rig eval's outputs: metrics.json and a self-contained report.html."""

from __future__ import annotations

import base64
import hashlib
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from rigcli import RigError, __version__
from rigcli.edit.editor import DEFAULT_STRENGTH, Editor
from rigcli.evaluate.cross import CrossResult, cross_doc, measure_cross
from rigcli.evaluate.metrics import DECIMALS, SAME_PERSON
from rigcli.evaluate.quality import BOUNDS, IDENTITY_BOUND, NO_FACE
from rigcli.evaluate.suite import (
    CLOSEUP_GROWTH,
    KINDS,
    METRICS,
    QUALITY_METRICS,
    SUITE_DOC,
    EvalPhoto,
    Evaluation,
    ModelRun,
    ModelSpec,
    eval_photos,
    evaluate,
    model_folder,
    parse_spec,
)
from rigcli.files import atomic_write_bytes, atomic_write_json, now_iso
from rigcli.image.grid import grid
from rigcli.image.photo import encode_png


def _settings(person: str, seed: int, photos: Sequence[EvalPhoto]) -> dict:
    """What every metrics.json starts with: who, when, by which rig, the seed, and the photos (with
    their files' SHA-256)."""
    return {
        "person": person,
        "created": now_iso(),
        "rig_version": __version__,
        "seed": seed,
        "photos": [
            {"label": p.label, "path": str(p.path), "sha256": hashlib.sha256(p.path.read_bytes()).hexdigest()}
            for p in photos
        ],
    }


def metrics_json(evaluation: Evaluation) -> dict:
    """The evaluation as JSON: settings, photos (with their files' SHA-256), per model every edit's
    metrics and the per-type summary."""

    return {
        **_settings(evaluation.person, evaluation.seed, evaluation.photos),
        "suite": SUITE_DOC,
        "same_person_threshold": SAME_PERSON,
        "rounding": f"every number is round(value, {DECIMALS}); report.html shows the same values",
        "quality": QUALITY_DOC,
        "quality_bounds": doc_bounds(),
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


QUALITY_DOC = (
    "Issue 26's measures, for a model run at a strength (rig edit's method), of the full-size output against "
    "the photo, from the 68 landmarks dlib finds in each (not from rig's fit): light_balance_before/after, "
    "the skin's mean luminance left of the nose line over right of it (image sides); mouth_width_ratio, "
    "mouth-corner distance over eye width, output over input; eye_opening_ratio, the eyelids' opening, output "
    "over input; nose_offset_change, how far the nose tip moved from the eyes' midpoint along the eye line "
    "(eye widths, > 0: toward the image's right); foreign_pixels_pct, the share of a band around the face whose "
    "colour the input does not show nearby (paint over hair, a halo on the wall); colour_blotches_pct, the "
    "same on chromaticity over the face (speckle, blotches). quality_face_found: false where dlib finds no face "
    "in the output (the measures are then null); quality_misses: the bounds of quality_bounds the edit misses "
    "(empty: it meets them all; null for an edit the issue does not name). All null at the model's size."
)


def cross_cell(method: dict) -> str:
    """A measured method of the pairs measure as a table shows it: its error and its change against the
    physical edit, e.g. ``22.94 (-1.3 %)``."""
    change = method["vs_physical_pct"]
    return f"{format_value(method['error'])} ({'-' if change is None else f'{change:+.1f} %'})"


def _png_uri(image: np.ndarray) -> str:

    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def _jpeg_uri(image: np.ndarray, quality: int = 90) -> str:
    """A photo-size close-up as a JPEG (several times smaller than a PNG of a photo), its chroma kept
    at full resolution so colour speckle shows as it is."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def verdict(metrics: dict) -> tuple[str, str]:
    """An edit against issue 26's bounds: (CSS class, words): pass, the bounds missed, or none set."""
    missed = metrics.get("quality_misses")
    if missed is None:
        return "none", NO_FACE if metrics.get("quality_face_found") is False else "-"
    return ("miss", "miss: " + "; ".join(missed)) if missed else ("pass", "pass")


CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; background: #fff; }
th, td { border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; text-align: right; }
th { background: #eee; } td.name { text-align: left; }
img.row { height: 128px; image-rendering: pixelated; }
p.note, ul.note { color: #555; font-size: 13px; max-width: 960px; }
td.pass { background: #dff3e0; color: #14532d; text-align: left; }
td.miss { background: #fde2e1; color: #7f1d1d; text-align: left; }
td.none { color: #888; text-align: left; }
div.sheet { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
div.sheet figure { margin: 0; width: min-content; background: #fff; border: 3px solid #ccc; }
div.sheet figure.pass { border-color: #2e7d32; } div.sheet figure.miss { border-color: #c62828; }
div.sheet img { display: block; max-width: none; }
div.sheet figcaption { font-size: 13px; padding: 2px 6px; max-width: 100%; }
"""


def _page_head(person: str) -> str:
    esc = html.escape
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>rig eval {esc(person)}</title><style>{CSS}</style></head><body><h1>rig eval: {esc(person)}</h1>"
    )


def report_html(evaluation: Evaluation, doc: dict) -> str:
    """A self-contained page: the summary table (the values of ``doc``, metrics.json) and per edit
    type a grid, one row per photo and edit: input | edited shaded, normal | output of each model."""
    esc = html.escape
    parts = [
        _page_head(evaluation.person),
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
    for run, model in zip(evaluation.runs, doc["models"], strict=True):
        if any(e.closeup is not None for e in run.edits):
            parts += quality_section(evaluation, run, model)
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


def quality_section(evaluation: Evaluation, run: ModelRun, model: dict) -> list[str]:
    """One strength run's issue-26 measures: a table, one row per edit, with its pass or misses
    against the bounds; then per photo a contact sheet of the input and every output, cut around the
    face at the photo's own pixels (not resized), each framed green (pass), red (miss) or grey."""
    esc = html.escape
    label = model["label"]
    bounds = "".join(f"<li><b>{esc(name)}</b>: {esc(', '.join(texts))}</li>" for name, texts in doc_bounds().items())
    parts = [
        f"<h2 id='quality-{esc(label)}'>Issue 26's measures: {esc(label)}</h2>",
        f"<p class='note'>{esc(QUALITY_DOC)}</p><p class='note'>The bounds, per edit the issue names (identity: "
        f"id dist, dlib's descriptor distance, at the crop size):</p><ul class='note'>{bounds}</ul>",
        f"<table class='quality' data-model='{esc(label)}'><thead><tr><th>photo</th><th>edit</th>"
        "<th data-key='identity_euclidean'>id dist</th>",
    ]
    parts += [f"<th data-key='{key}'>{esc(title)}</th>" for key, title in QUALITY_METRICS]
    parts.append("<th data-key='quality_misses'>issue 26's bounds</th></tr></thead><tbody>")
    for edit in model["edits"]:
        css, words = verdict(edit)
        parts.append(
            f"<tr data-photo='{esc(edit['photo'])}' data-label='{esc(edit['label'])}'><td class='name'>"
            f"{esc(edit['photo'])}</td><td class='name'>{esc(edit['label'])}</td>"
            f"<td data-key='identity_euclidean'>{format_value(edit['identity_euclidean'])}</td>"
        )
        parts += [f"<td data-key='{key}'>{format_value(edit[key])}</td>" for key, _ in QUALITY_METRICS]
        parts.append(f"<td class='{css}' data-key='quality_misses'>{esc(words)}</td></tr>")
    parts.append("</tbody></table>")
    for photo in evaluation.photos:
        edits = [e for e in run.edits if e.photo == photo.label and e.closeup is not None]
        if not edits:
            continue
        height, width = edits[0].closeup.shape[:2]
        parts.append(
            f"<h3>Contact sheet: {esc(photo.label)}, {esc(label)}</h3><p class='note'>Input first, then every "
            f"edit, each {width} x {height} px of the photo itself (the landmarks' box grown "
            f"{CLOSEUP_GROWTH:g} times; not resized: view the page at 100 % to see each pixel), framed green "
            "where the edit meets issue 26's bounds and red where it misses one.</p>"
            f"<div class='sheet' data-model='{esc(label)}' data-photo='{esc(photo.label)}'>"
        )
        tiles = [("input", "none", "the photo", evaluation.closeups[photo.label])]
        tiles += [(e.label, *verdict(e.metrics), e.closeup) for e in edits]
        for name, css, words, image in tiles:
            words = "" if words == "-" else words
            parts.append(
                f"<figure class='{css}'><img alt='{esc(name)}' width='{image.shape[1]}' height='{image.shape[0]}' "
                f"src='{_jpeg_uri(image)}'><figcaption><b>{esc(name)}</b> {esc(words)}</figcaption></figure>"
            )
        parts.append("</div>")
    return parts


def cross_report_html(result: CrossResult, doc: dict) -> str:
    """``rig eval --cross``'s page: the pairs measure's table (the values of ``doc``'s ``cross``, one row
    per pair and the mean, an error and its change against the physical edit per method), the verdict
    per strength, and per pair a sheet: A | physical edit | model edit(s) | B, each aligned to B."""
    esc = html.escape
    cross = doc["cross"]
    labels = [m["label"] for m in cross["mean"]["methods"]]
    parts = [
        _page_head(doc["person"]),
        f"<p class='note'>{len(doc['photos'])} photo(s): {esc(', '.join(p['label'] for p in doc['photos']))}; "
        f"seed {doc['seed']}; model {esc(doc['model'])}, {cross['steps']} DDIM steps, engine {esc(doc['engine'])}. "
        f"Numbers are rounded to {DECIMALS} decimals, as in metrics.json.</p>",
        f"<h2>Issue 27's pairs measure</h2><p class='note'>{esc(cross['doc'])}</p>",
        "<table id='cross'><thead><tr><th>A</th><th>B</th>",
    ]
    parts += [f"<th>{esc(label)}</th>" for label in labels]
    parts.append("</tr></thead><tbody>")

    def cell(method: dict) -> str:
        if method.get("error") is None:
            return f"<td class='none'>{esc(method.get('reason') or '-')}</td>"
        return f"<td>{cross_cell(method)}</td>"

    for pair in cross["pairs"]:
        parts.append(f"<tr data-a='{esc(pair['a'])}' data-b='{esc(pair['b'])}'><td class='name'>{esc(pair['a'])}"
                     f"</td><td class='name'>{esc(pair['b'])}</td>")  # fmt: skip
        if pair["reason"]:
            parts.append(f"<td class='none' colspan='{len(labels)}'>{esc(pair['reason'])}</td></tr>")
            continue
        parts += [cell(m) for m in pair["methods"]]
        parts.append("</tr>")
    mean = cross["mean"]
    parts.append(f"<tr data-a='mean'><td class='name' colspan='2'>mean over {mean['pairs']} pair(s)</td>")
    parts += [cell(m) for m in mean["methods"]]
    parts.append("</tr></tbody></table><ul class='note'>")
    for v in cross["verdicts"]:
        css = "none" if v["better_by_bound"] is None else ("pass" if v["better_by_bound"] else "miss")
        parts.append(f"<li class='verdict {css}'>{esc(v['text'])}</li>")
    for line in cross["foreign"]:
        css = "none" if line["within_bound"] is None else ("pass" if line["within_bound"] else "miss")
        parts.append(f"<li class='foreign {css}'>{esc(line['text'])}</li>")
    parts.append("</ul>")
    columns = " | ".join(["A", *labels[1:], "B"])
    parts.append(
        f"<h2>Sheets</h2><p class='note'>Per pair: {esc(columns)}; each aligned to B by the similarity of dlib's "
        "landmarks (uncovered pixels black; a failed method black), cut around B's face.</p>"
    )
    for pair in result.pairs:
        if pair.sheet is None:
            continue
        words = f"{pair.a} to {pair.b}"
        parts.append(
            f"<figure class='cross' data-a='{esc(pair.a)}' data-b='{esc(pair.b)}'><img alt='{esc(words)}' "
            f"src='{_jpeg_uri(pair.sheet)}'><figcaption>{esc(words)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "".join(parts)


def doc_bounds() -> dict[str, list[str]]:
    """Issue 26's bounds per named edit, in words (metrics.json's ``quality_bounds``)."""
    return {label: [f"identity <= {IDENTITY_BOUND}", *(b.text for b in bounds)] for label, bounds in BOUNDS.items()}


def output_paths(out_dir: Path) -> tuple[Path, Path]:
    return Path(out_dir) / "metrics.json", Path(out_dir) / "report.html"


def write_outputs(evaluation: Evaluation, out_dir: Path) -> tuple[Path, Path, dict]:
    """Write metrics.json and report.html (each atomically); return their paths and the JSON."""

    metrics_path, report_path = output_paths(out_dir)
    doc = metrics_json(evaluation)
    atomic_write_json(metrics_path, doc)
    atomic_write_bytes(report_path, report_html(evaluation, doc).encode("utf-8"))
    return metrics_path, report_path, doc


def run_cross(
    store,
    name: str,
    photos: Sequence[EvalPhoto],
    spec: ModelSpec,
    strengths: Sequence[float],
    *,
    seed: int = 0,
    device: str = "cpu",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[CrossResult, dict]:
    """Issue 27's pairs measure on every ordered pair of ``photos`` by the model of ``spec``, and
    metrics.json's document for it (settings, photos, the ``cross`` section)."""
    if len(photos) < 2:
        raise RigError(f"--cross needs at least 2 photos to pair, got {len(photos)}")
    editor = Editor(store, name, model_folder(store, name, spec.model), device, engine=spec.engine)
    pairs = [(p.label, p.path) for p in photos]
    result = measure_cross(editor, pairs, strengths, spec.steps, seed=seed, on_progress=on_progress)
    doc = _settings(name, seed, photos) | {"model": spec.model, "engine": spec.engine, "cross": cross_doc(result)}
    return result, doc


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
    cross: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> EvalRun:
    """``rig eval``: choose the photos, run the suite on the model (and ``compare``'s, a
    ``MODEL[:STEPS][@ENGINE]`` spec), write metrics.json and report.html into ``out_dir``
    (default ``eval-NAME``); the outputs are checked before any work. ``strengths``: each model is
    run by ``rig edit``'s method at the photo's size once per strength, instead of by the paper's
    edit at the model's size. ``cross``: issue 27's pairs measure (``cross.py``) instead of the suite, the
    model's edit at each of ``strengths`` (default: rig edit's) beside A unedited and the physical edit."""
    for value in strengths or ():
        if not 0 <= value <= 1:
            raise RigError(f"--strength {value:g}: give values between 0 and 1")
    target = Path(out_dir or f"eval-{name}")
    existing = [str(p) for p in output_paths(target) if p.exists()]
    if existing and not force:
        raise RigError(f"output exists (pass --force to overwrite): {', '.join(existing)}")
    chosen = eval_photos(store, name, holdout, photos)
    first = ModelSpec(model, steps, engine)
    if cross:
        if compare is not None:
            raise RigError("--compare does not apply to --cross: run it once per model")
        result, doc = run_cross(store, name, chosen, first, strengths or [DEFAULT_STRENGTH], seed=seed,
                                device=device, on_progress=on_progress)  # fmt: skip
        metrics_path, report_path = output_paths(target)
        atomic_write_json(metrics_path, doc)
        atomic_write_bytes(report_path, cross_report_html(result, doc).encode("utf-8"))
        return EvalRun(len(chosen), metrics_path, report_path, doc)
    specs = [first] if compare is None else [first, parse_spec(compare, first)]
    if strengths:
        specs = [replace(spec, strength=float(value)) for spec in specs for value in strengths]
    evaluation = evaluate(store, name, chosen, specs, seed=seed, device=device, on_progress=on_progress)
    metrics_path, report_path, doc = write_outputs(evaluation, target)
    return EvalRun(len(chosen), metrics_path, report_path, doc)
