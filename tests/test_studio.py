"""rig studio: the service behind the page (no browser), and the page itself in Debian's headless
chromium driven by Playwright, against a tiny model fine-tuned here on real photos."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rigcli import RigError
from rigcli.edit.controls import EXPRESSION_CONTROLS
from rigcli.image.photo import PhotoError
from rigcli.store import Store
from rigcli.studio import PREVIEW_SIZE, Settings, Studio
from tests.conftest import SHARED

REAL = SHARED / "assets" / "real"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [  # the machine's network is closed: no background connections
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory, trained_people) -> Path:
    """A store with obama-1..3 fitted and a tiny model fine-tuned from scratch on them, and a
    second person with photos but no model (conftest's TRAINED_PEOPLE): the module's own copy."""
    return trained_people.home(tmp_path_factory.mktemp("studio"), "obama", "biden")


@pytest.fixture
def studio(home, tmp_path) -> Studio:
    return Studio(Store(home), out_dir=tmp_path / "out")


def uploaded(studio: Studio, source: Path) -> Path:
    """A file as Gradio leaves an upload: under the studio's upload folder."""
    folder = studio.upload_dir / os.urandom(4).hex()
    folder.mkdir(parents=True)
    return Path(shutil.copy(source, folder / source.name))


def test_paths_from_the_page_are_refused_unless_they_are_uploads_or_album_ids(studio, home):
    outside = home / "people" / "obama" / "person.json"
    for bad in ("../person.json", str(outside), "/etc/hostname", "0930"):
        with pytest.raises(RigError, match="has no photo"):
            studio.album_photo("obama", bad)
    for bad in (outside, Path("/etc/hostname"), studio.upload_dir / ".." / "x.jpg"):
        with pytest.raises(RigError, match="only photos uploaded"):
            studio.upload(bad)
    photo_id = studio.album("obama")[0][1]
    assert studio.album_photo("obama", photo_id).is_file()
    assert studio.upload(uploaded(studio, REAL / "obama-4.jpg")).is_file()


def test_untouched_sliders_leave_the_photo_as_fitted_and_a_moved_one_changes_the_preview(studio):
    session = studio.open_photo("obama", uploaded(studio, REAL / "obama-4.jpg"))
    untouched = Settings(expression=dict(session.amounts))
    controls = studio.controls(session, untouched)
    assert not controls.expression and controls.light is None and controls.light_dir is None
    assert (controls.yaw, controls.pitch, controls.roll) == (0, 0, 0)
    names = studio.editor("obama").face_model.expression_names
    jaw = session.weight("jawOpen")
    assert jaw == pytest.approx(float(session.fit.expression[0, names.index("jawOpen")].clamp(0, 1)))
    at_fit = Settings(expression=dict(session.amounts), blend_name="jawOpen", blend_weight=jaw)
    assert not studio.controls(session, at_fit).blend, "a blendshape slider left where it starts changes nothing"
    moved = Settings(expression=dict(session.amounts), blend_name="jawOpen", blend_weight=min(1.0, jaw + 0.5))
    assert studio.controls(session, moved).blend == {"jawOpen": min(1.0, jaw + 0.5)}

    plain = studio.preview(session.key, untouched)
    assert plain.shape == (PREVIEW_SIZE, PREVIEW_SIZE, 3)
    with_buffers = studio.preview(session.key, untouched, buffers=True)
    assert with_buffers.shape == (PREVIEW_SIZE, 3 * PREVIEW_SIZE, 3)
    np.testing.assert_array_equal(with_buffers[:, :PREVIEW_SIZE], plain)
    photo_only = studio.preview(session.key, untouched, opacity=0.0)
    half = studio.preview(session.key, untouched, opacity=0.5).astype(int)
    assert np.abs(half - (photo_only.astype(int) + plain) / 2).max() <= 1, "opacity blends render and photo"
    assert (photo_only != plain).any(axis=-1).mean() > 0.2, "at opacity 1 the render covers the face"

    smiling = Settings(expression=session.amounts | {"smile": 1.0})
    assert studio.controls(session, smiling).expression == {"smile": 1.0}
    changed = np.abs(studio.preview(session.key, smiling).astype(int) - plain).max(-1) > 8
    assert changed.sum() > 200, "a full smile moves the rendered mouth"
    assert changed[PREVIEW_SIZE // 2 :].sum() > 0.8 * changed.sum(), "mostly the lower face changes"

    lit = studio.preview(session.key, Settings(expression=dict(session.amounts), light="direction", light_yaw=-80))
    left, right = lit[:, : PREVIEW_SIZE // 2].astype(float), lit[:, PREVIEW_SIZE // 2 :].astype(float)
    base_left, base_right = plain[:, : PREVIEW_SIZE // 2].astype(float), plain[:, PREVIEW_SIZE // 2 :].astype(float)
    assert left.mean() - base_left.mean() > right.mean() - base_right.mean(), "light from the image's left"


def test_settings_become_rig_edits_controls(studio):
    session = studio.open_photo("obama", uploaded(studio, REAL / "obama-4.jpg"))
    amounts = dict(session.amounts)
    controls = studio.controls(session, Settings(light="direction", light_yaw=-30, light_pitch=10, expression=amounts))
    assert controls.light_dir == (-30, 10)
    photo_id = studio.album("obama")[1][1]
    controls = studio.controls(session, Settings(light="album photo", light_photo=photo_id, expression=amounts))
    assert controls.light_from == studio.album_photo("obama", photo_id)
    controls = studio.controls(
        session, Settings(light="left", set_intensity=True, intensity=1.5, ambient=0.2, expression=amounts)
    )
    assert (controls.light, controls.light_intensity, controls.ambient) == ("left", 1.5, 0.2)
    with pytest.raises(RigError, match="choose the album photo"):
        studio.controls(session, Settings(light="album photo"))
    with pytest.raises(RigError, match="unknown light"):
        studio.controls(session, Settings(light="sideways"))


def test_bad_input_says_why(studio, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    with pytest.raises(PhotoError):
        studio.open_photo("obama", uploaded(studio, text))
    with pytest.raises(PhotoError, match="not obama"):
        studio.open_photo("obama", uploaded(studio, REAL / "biden-2.jpg"))
    with pytest.raises(RigError, match="no fine-tuned model"):
        studio.open_photo("biden", uploaded(studio, REAL / "biden-2.jpg"))
    with pytest.raises(RigError, match="choose a photo first"):
        studio.preview(None, Settings())


def test_edit_writes_the_photo_at_its_size_under_the_output_folder_only(studio):
    session = studio.open_photo("obama", uploaded(studio, REAL / "obama-4.jpg"))
    settings = Settings(light="left", expression=session.amounts | {"smile": 0.9})
    made = studio.edit(session.key, settings, steps=6)
    assert made.path.parent == studio.out_dir and made.path.suffix == ".png"
    written = np.asarray(Image.open(made.path).convert("RGB"))
    np.testing.assert_array_equal(written, made.after)
    assert made.after.shape == session.prepared.pixels.shape
    assert np.abs(made.after.astype(int) - session.prepared.pixels).max() > 20
    assert made.identity_distance is not None and made.identity_distance < 0.6
    again = studio.edit(session.key, settings, steps=6)
    assert again.path != made.path, "every edit gets its own file"
    gif = studio.sweep(session.key, settings, "smile=0:1:3", steps=4)
    assert gif.parent == studio.out_dir and Image.open(gif).n_frames == 3
    assert {p.name for p in studio.out_dir.iterdir()} == {made.path.name, again.path.name, gif.name, "uploads"}


# -- the page in a real browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_files(home: Path) -> dict[str, float]:
    """Every file of the store outside studio/ with its modification time."""
    return {
        str(p.relative_to(home)): p.stat().st_mtime
        for p in home.rglob("*")
        if p.is_file() and p.relative_to(home).parts[0] != "studio"
    }


class StudioProcess:
    """``rig studio`` running as a user starts it, its output collected by a thread as it comes."""

    def __init__(self, home: Path, *args: str, cwd: Path | None = None):
        self.port = free_port()
        command = [sys.executable, "-m", "rigcli", "--home", str(home), "studio", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--device", "cpu", *args], cwd=cwd, env=dict(os.environ, COLUMNS="200"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()
        self.url = f"http://127.0.0.1:{self.port}/"

    def wait_ready(self, timeout: float = 90) -> str:
        """Once it says where it listens and the page answers: the URL."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.reader.join(5)
                pytest.fail(f"rig studio exited: {''.join(self.lines)}")
            if any(line.startswith("rig studio: http") and f":{self.port}/" in line for line in self.lines):
                urllib.request.urlopen(self.url, timeout=10)
                return self.url
            time.sleep(0.3)
        self.process.kill()
        pytest.fail(f"rig studio did not start within {timeout} s: {''.join(self.lines)}")

    def stop(self) -> str:
        """Stop it as Ctrl-C would; its whole output."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(5)
        return "".join(self.lines)


def start_studio(home: Path, *args: str, cwd: Path | None = None) -> StudioProcess:
    studio = StudioProcess(home, *args, cwd=cwd)
    studio.wait_ready()
    return studio


@pytest.fixture(scope="module")
def server(home, tmp_path_factory):
    """The studio over the test store, started from an empty working folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    before = store_files(home)
    studio = start_studio(home, cwd=cwd)
    yield studio.url, home, cwd, before
    output = studio.stop()
    ours = str(Path(__file__).resolve().parents[1] / "rigcli")
    assert ours not in output, output  # no request failed inside rig (Gradio logs its own refusals)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(url)
    page.locator("#person input").click()
    page.get_by_role("option", name="obama").click()
    wait_for_text(page, "#status", "photos")
    return page


def wait_for_text(page, selector: str, text: str, timeout: float = 120_000) -> str:
    page.wait_for_function(
        "([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)", arg=[selector, text], timeout=timeout
    )
    return page.locator(selector).inner_text()


def fetch_image(page, src: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def upload(page, path: Path) -> str:
    page.locator("#upload input[type=file]").set_input_files(str(path))
    return wait_for_text(page, "#status", path.name)


def after_image(page) -> np.ndarray:
    return fetch_image(page, page.locator("#result img").last.get_attribute("src"))


def test_the_page_previews_edits_and_reports_bad_input(server, browser, tmp_path):
    url, home, cwd, before = server
    page = open_page(browser, url)
    assert "fitted" in upload(page, REAL / "obama-4.jpg")
    src = page.locator("#preview img").get_attribute("src")
    first = fetch_image(page, src)
    page.locator("#slider-smile input[type=range]").fill("1")
    page.wait_for_function("s => document.querySelector('#preview img').src != s", arg=src, timeout=30_000)
    moved = fetch_image(page, page.locator("#preview img").get_attribute("src"))
    assert first.shape == moved.shape == (PREVIEW_SIZE, PREVIEW_SIZE, 3)
    assert (np.abs(moved.astype(int) - first).max(-1) > 8).sum() > 200, "the smile slider moved the preview"

    page.locator("#edit").click()
    info = wait_for_text(page, "#info", "identity distance")
    after = after_image(page)
    photo = np.asarray(Image.open(REAL / "obama-4.jpg").convert("RGB"))
    assert after.shape == photo.shape, "the edit comes back at the photo's size"
    assert np.abs(after.astype(int) - photo).max() > 20
    name = info.split()[0]
    assert (home / "studio" / name).is_file()
    shot = Path(os.environ.get("RIG_TEST_ARTIFACTS", tmp_path)) / "studio.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)

    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a photo")
    page.locator("#upload button[aria-label='Clear']").first.click()
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    message = wait_for_text(page, "#status", "⚠")
    assert "notes.txt" in message or "image" in message.lower(), message
    page.close()
    page = open_page(browser, url)  # the server is still serving
    assert "fitted" in upload(page, REAL / "obama-1.jpg")
    page.close()

    assert store_files(home) == before, "the studio changed the store outside studio/"
    assert not list(cwd.iterdir()), "the studio wrote into its working folder"


def test_two_pages_editing_at_once_both_get_their_own_photo(server, browser):
    url, home, _, _ = server
    pages = [open_page(browser, url), open_page(browser, url)]
    photos = [REAL / "obama-4.jpg", REAL / "obama-2.jpg"]
    for page, path in zip(pages, photos, strict=True):
        assert "fitted" in upload(page, path)
    for page in pages:
        page.locator("#edit").click()
    names = [wait_for_text(page, "#info", "identity distance").split()[0] for page in pages]
    assert names[0] != names[1]
    for page, path in zip(pages, photos, strict=True):
        size = Image.open(path).size
        assert after_image(page).shape == (size[1], size[0], 3), "each page gets the edit of its own photo"
        page.close()
    assert all((home / "studio" / n).is_file() for n in names)


def call(url: str, api: str, data: list) -> tuple[str, str]:
    """Gradio's HTTP API as any client may call it: (last event, its data)."""
    request = urllib.request.Request(
        f"{url}gradio_api/call/{api}", json.dumps({"data": data}).encode(), {"Content-Type": "application/json"}
    )
    event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    stream = urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=120).read().decode()
    events = [line.split(":", 1)[1].strip() for line in stream.splitlines() if line.startswith("event:")]
    payloads = [line.split(":", 1)[1].strip() for line in stream.splitlines() if line.startswith("data:")]
    return events[-1], payloads[-1]


def test_requests_naming_paths_are_refused(server):
    url, home, cwd, before = server
    controls = ["photo", 0, 0, False, 0.8, 0.35, None, *[0.0] * len(EXPRESSION_CONTROLS), None, 0, 0, 0, 0, False]
    for photo_id in ("../person.json", str(home / "people" / "obama" / "person.json"), "/etc/hostname"):
        event, data = call(url, "open_album", ["obama", photo_id, *controls])
        assert event == "error" or "⚠" in data, (photo_id, event, data)
    secret = home / "people" / "obama" / "person.json"
    for path in (str(secret), "/etc/hostname"):
        upload = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "x.jpg"}
        event, data = call(url, "open_upload", ["obama", upload, *controls])
        assert event == "error" or "⚠" in data, (path, event, data)
        assert secret.read_text() not in data
    for target in (str(secret), "/etc/hostname", "../people/obama/person.json"):
        try:
            code = urllib.request.urlopen(f"{url}gradio_api/file={target}", timeout=10).status
        except urllib.error.HTTPError as exc:
            code = exc.code
        assert code in (403, 404), (target, code)
    assert store_files(home) == before
    assert not list(cwd.iterdir())


def test_without_gradio_the_command_says_how_to_install_it(home, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from rigcli.cli import app

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    result = CliRunner().invoke(app, ["--home", str(home), "studio", "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "pip install 'rig[studio]'" in result.output
    assert not (tmp_path / "o").exists()


def test_listening_beyond_this_machine_warns(home, tmp_path):
    studio = start_studio(home, "--host", "0.0.0.0", "--out-dir", str(tmp_path / "o"))
    output = studio.stop()
    assert "warning: listening on 0.0.0.0" in output, output
    assert f":{studio.port}" in output, "it says where it listens"
