"""The studio's web page (Gradio) over ``Studio``: every control of ``rig edit`` as a slider or a
choice, a live preview of the edited face model on every move, and one button for the model's edit.

Gradio is imported when the page is built (``serve``), so the rest of rig runs without it. Its own
files (uploads, the images it sends the page) are kept under the studio's folder, and it serves no
file outside that folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rigcli import RigError
from rigcli.edit.controls import EXPRESSION_CONTROLS, MAX_POSE_DEG
from rigcli.edit.editor import DEFAULT_STRENGTH
from rigcli.studio import LIGHT_MODES, Settings, Studio, engine_choices

STUDIO_HINT = "the studio needs Gradio: pip install 'rig[studio]'"
VIEW = 2  # the last control values are the preview's view (buffers shown, opacity), not Settings
CSS = "#preview img, #result img {object-fit: contain}"


def missing_gradio() -> str | None:
    """Why the page cannot be built here (None when Gradio imports)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        return STUDIO_HINT
    return None


def _settings(values: list) -> Settings:
    """The page's control values, in the order of ``build``'s ``controls`` list (less the VIEW ones),
    as Settings."""
    (light, light_yaw, light_pitch, set_intensity, intensity, ambient, light_photo, *rest) = values
    expression = dict(zip(EXPRESSION_CONTROLS, rest[: len(EXPRESSION_CONTROLS)], strict=True))
    blend_name, blend_weight, yaw, pitch, roll = rest[len(EXPRESSION_CONTROLS) :]
    return Settings(
        light=light, light_yaw=light_yaw, light_pitch=light_pitch, set_intensity=set_intensity,
        intensity=intensity, ambient=ambient, light_photo=light_photo or None,
        expression={k: float(v) for k, v in expression.items()}, blend_name=blend_name or None,
        blend_weight=blend_weight, yaw=yaw, pitch=pitch, roll=roll,
    )  # fmt: skip


def build(studio: Studio):
    """The page: people, photo, controls with live preview, edit with before/after, sweep."""
    import gradio as gr

    def fail(exc: Exception):
        """A plain message in the page (the server goes on serving)."""
        raise gr.Error(str(exc), print_exception=False) from None

    def pick_person(name: str | None):
        if not name:
            return gr.update(choices=[], value=None), gr.update(choices=[], value=None), None, "Pick a person."
        try:
            album = studio.album(name)
            sheet = studio.fit_sheet(name)
        except RigError as exc:
            return gr.update(choices=[]), gr.update(choices=[]), None, f"⚠ {exc}"
        return (
            gr.update(choices=album, value=None),
            gr.update(choices=album, value=None),
            sheet,
            f"{name}: {len(album)} photos. Upload a photo of {name} or pick one of the album.",
        )

    sliders_out = []  # the expression sliders, set to the photo's own amounts when a photo opens

    def open_photo(name, path_of, value, values):
        """A photo chosen: find the person's face, fit it, set the expression sliders to its own
        amounts and show the preview. ``path_of(name, value)`` says which file (upload or album id)."""
        keep = (gr.update(), gr.update(), *(gr.update() for _ in sliders_out))
        if not value:
            return *keep, gr.update()
        try:
            if not name:
                raise RigError("pick a person first")
            path = path_of(name, value)
            session = studio.open_photo(name, path)
            settings = _settings(list(values[:-VIEW]))
            settings.expression = dict(session.amounts)
            preview = studio.preview(session.key, settings, *values[-VIEW:])
        except RigError as exc:  # no photo is open now: the preview and edit say so
            return None, None, *keep[2:], f"⚠ {exc}"
        amounts = [gr.update(value=round(session.amounts[c], 3)) for c in EXPRESSION_CONTROLS]
        height, width = session.prepared.pixels.shape[:2]
        return session.key, preview, *amounts, f"{path.name}: {width}x{height}, {name}'s face found and fitted."

    def open_upload(name, upload, *values):
        return open_photo(name, lambda _, path: studio.upload(path), upload, values)

    def open_album(name, photo_id, *values):
        return open_photo(name, studio.album_photo, photo_id, values)

    def preview(key, *values):
        try:
            return studio.preview(key, _settings(list(values[:-VIEW])), *values[-VIEW:]), gr.update()
        except RigError as exc:
            return gr.update(), f"⚠ {exc}"

    def edit(key, strength, steps, engine, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's marker)
        def moved(stage: str, done: int, total: int) -> None:
            progress((done, max(total, 1)), desc=stage)

        try:
            made = studio.edit(
                key, _settings(list(values[:-VIEW])), strength=strength, steps=int(steps), engine=engine,
                on_progress=moved,
            )  # fmt: skip
        except RigError as exc:
            fail(exc)
        distance = "no face found in the output" if made.identity_distance is None else f"{made.identity_distance:.3f}"
        psnr = "-" if made.reconstruction_psnr is None else f"{made.reconstruction_psnr:.1f} dB"
        height, width = made.after.shape[:2]
        info = f"**{made.path.name}** ({width}x{height}) · identity distance {distance} · reconstruction {psnr}"
        if made.warning:
            info += f"\n\n⚠ {made.warning}"
        return (made.before, str(made.path)), str(made.path), info  # the PNG written is what the page shows

    def sweep(key, strength, steps, engine, control, low, high, frames, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's marker)
        def moved(stage: str, done: int, total: int) -> None:
            progress((done, max(total, 1)), desc=stage)

        try:
            spec = f"{control}={low}:{high}:{int(frames)}"
            path = studio.sweep(
                key, _settings(list(values[:-VIEW])), spec, strength=strength, steps=int(steps), engine=engine,
                on_progress=moved,
            )  # fmt: skip
        except RigError as exc:
            fail(exc)
        return str(path), str(path)

    with gr.Blocks(title="rig studio", delete_cache=(600, 3600)) as page:
        gr.Markdown("# rig studio\nEdit photos of a person with their fine-tuned model: light, expression, pose.")
        key = gr.State(None)
        with gr.Accordion("People", open=True):
            gr.Dataframe(
                value=studio.people(), headers=["person", "photos used / album", "3D fit", "model"],
                interactive=False, label="The store's people",
            )  # fmt: skip
            people = studio.store.people()
            person = gr.Dropdown(people, value=None, label="Person", elem_id="person")
            with gr.Accordion("Fit sheet (crop, shaded, normal, albedo per album photo)", open=False):
                sheet = gr.Image(label="Fit sheet", interactive=False, show_label=False)
        status = gr.Markdown("Pick a person.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload a photo", type="filepath", elem_id="upload")
                album = gr.Dropdown([], value=None, label="…or one of the album", elem_id="album")
                with gr.Accordion("Light", open=True):
                    light = gr.Radio(
                        list(LIGHT_MODES), value="photo", label="Light",
                        info="photo: as taken; a side; a direction (yaw, pitch); or an album photo's light",
                    )  # fmt: skip
                    light_yaw = gr.Slider(-90, 90, 0, step=1, label="Light yaw (°, + to the image's right)")
                    light_pitch = gr.Slider(-90, 90, 0, step=1, label="Light pitch (°, + up)")
                    set_intensity = gr.Checkbox(False, label="Set intensity and ambient (else the photo's brightness)")
                    intensity = gr.Slider(0, 4, 0.8, step=0.05, label="Intensity")
                    ambient = gr.Slider(0, 4, 0.35, step=0.05, label="Ambient")
                    light_photo = gr.Dropdown([], value=None, label="Light from album photo")
                with gr.Accordion("Expression (sliders start at the photo's own)", open=True):
                    expression = [
                        gr.Slider(0, 1, 0, step=0.01, label=c.replace("_", " "), elem_id=f"slider-{c}")
                        for c in EXPRESSION_CONTROLS
                    ]
                    blend_name = gr.Dropdown([], value=None, label="Any blendshape")
                    blend_weight = gr.Slider(0, 1, 0, step=0.01, label="Blendshape weight")
                with gr.Accordion("Pose (added to the photo's)", open=True):
                    pose = [
                        gr.Slider(-MAX_POSE_DEG, MAX_POSE_DEG, 0, step=0.5, label=f"{axis} (°)")
                        for axis in ("Yaw", "Pitch", "Roll")
                    ]
                with gr.Row():
                    show_buffers = gr.Checkbox(False, label="Show the normal and albedo buffers")
                    opacity = gr.Slider(0, 1, 1, step=0.05, label="Preview: the render's opacity over the photo")
            with gr.Column(scale=2):
                preview_image = gr.Image(
                    label="Live preview: the edited face model over the photo", interactive=False,
                    elem_id="preview", format="png",
                )  # fmt: skip
                with gr.Row():
                    strength = gr.Slider(0, 1, DEFAULT_STRENGTH, step=0.05, label="Strength (0: no model)")
                    steps = gr.Slider(2, 100, 20, step=1, label="DDIM steps")
                    engine = gr.Dropdown(engine_choices(studio.device), value=studio.engine, label="Engine")
                edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                result = gr.ImageSlider(label="Before / after", type="numpy", elem_id="result", format="png")
                info = gr.Markdown(elem_id="info")
                download = gr.DownloadButton("Download the PNG", elem_id="download")
                with gr.Accordion("Sweep one control into a GIF", open=False):
                    with gr.Row():
                        sweep_control = gr.Dropdown(list(EXPRESSION_CONTROLS), value="smile", label="Control")
                        low = gr.Number(0, label="From")
                        high = gr.Number(1, label="To")
                        frames = gr.Slider(2, 24, 6, step=1, label="Frames")
                    sweep_button = gr.Button("Make GIF")
                    gif = gr.Image(label="Sweep", interactive=False, format="gif")
                    gif_download = gr.DownloadButton("Download the GIF")

        controls = [
            light, light_yaw, light_pitch, set_intensity, intensity, ambient, light_photo, *expression,
            blend_name, blend_weight, *pose, show_buffers, opacity,
        ]  # fmt: skip
        sliders_out.extend(expression)

        def pick(name):
            album_update, light_update, sheet_value, message = pick_person(name)
            names = []
            if name:
                try:
                    names = studio.editor(name).control_names
                except RigError as exc:
                    message = f"⚠ {exc}"
            blends = gr.update(choices=names, value=None)
            return None, None, album_update, light_update, blends, sheet_value, message  # no photo open

        def pick_blendshape(key, name, *values):
            """A blendshape chosen: its slider starts at the photo's own weight (0 with no photo open)."""
            try:
                weight = studio.session(key).weight(name) if name else 0.0
                settings = _settings(list(values[:-VIEW]))
                settings.blend_name, settings.blend_weight = name, weight
                return gr.update(value=round(weight, 3)), studio.preview(key, settings, *values[-VIEW:])
            except RigError:  # no photo open yet: nothing to preview
                return gr.update(value=0.0), gr.update()

        person.change(pick, person, [key, preview_image, album, light_photo, blend_name, sheet, status])
        blend_name.change(pick_blendshape, [key, blend_name, *controls], [blend_weight, preview_image])
        opened = [key, preview_image, *expression, status]
        upload.change(open_upload, [person, upload, *controls], opened, api_name="open_upload")
        album.change(open_album, [person, album, *controls], opened, api_name="open_album")
        for control in controls:
            if control is blend_name:
                continue  # pick_blendshape previews it
            event = control.input if isinstance(control, gr.Slider) else control.change
            event(
                preview, [key, *controls], [preview_image, status], trigger_mode="always_last", show_progress="hidden"
            )
        edit_button.click(
            edit, [key, strength, steps, engine, *controls], [result, download, info], api_name="edit",
            concurrency_limit=1, concurrency_id="model",
        )  # fmt: skip
        sweep_button.click(
            sweep, [key, strength, steps, engine, sweep_control, low, high, frames, *controls], [gif, gif_download],
            api_name="sweep", concurrency_limit=1, concurrency_id="model",
        )  # fmt: skip
    return page


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    store,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    engine: str = "torch",
    out_dir: Path | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """``rig studio``: serve the page over ``store`` until interrupted. Edits and Gradio's own files
    (uploads, the images it sends) go under ``out_dir`` (default the store's ``studio/``) and nowhere
    else; ``on_ready(url)`` is told once the server listens."""
    if missing_gradio():
        raise RigError(STUDIO_HINT)
    studio = Studio(store, out_dir=out_dir, device=device, engine=engine)
    studio.upload_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(studio.upload_dir)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gradio as gr

    page = build(studio)
    page.queue(default_concurrency_limit=2)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.launch(
        server_name=host, server_port=port, allowed_paths=[str(studio.out_dir.resolve())], theme=theme, css=CSS,
        show_error=True, quiet=True, prevent_thread_lock=True, footer_links=[],
    )  # fmt: skip
    if on_ready is not None:
        on_ready(page.local_url)
    try:
        page.block_thread()
    finally:
        page.close()
