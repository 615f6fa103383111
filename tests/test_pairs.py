"""Issue 27: a personal model conditioned on the physical edit, trained on the album's own pairs
(photo A physically edited toward photo B's parameters, made into the real B)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rigcli import RigError
from rigcli.diffusion.checkpoints import load_model, save_model
from rigcli.diffusion.unet import DiffusionRig, preset, widened
from rigcli.edit.controls import Controls
from rigcli.edit.editor import Editor, edit_photos
from rigcli.enroll import crop_landmarks, read_face, read_fit
from rigcli.face.params import fit_from_json
from rigcli.face.registry import face_model_name, load_face_model
from rigcli.image.photo import read_photo
from rigcli.render.compose import physical_edit
from rigcli.store import Store
from rigcli.train import data as training_data
from rigcli.train.data import Augment, pair_turn, person_data
from rigcli.train.loop import TrainConfig, draw_rows, train

SIZE = 64


@pytest.fixture(scope="module")
def home(tmp_path_factory, trained_people):
    return trained_people.home(tmp_path_factory.mktemp("pairs"), "astro")


def album_fit(store: Store):
    fit_doc = read_fit(store, "astro")
    records = [r for r in store.load("astro").photos if r.train and r.id in fit_doc["photos"]]
    model = load_face_model(store, face_model_name(fit_doc))
    fit = fit_from_json([fit_doc["photos"][r.id] for r in records], fit_doc["identity"], model.expression_names)
    return records, fit_doc, model, fit


def box(image: np.ndarray) -> np.ndarray:
    """(C, C, K) uint8 -> (K, SIZE, SIZE), area-averaged as the training data is."""
    planes = [np.asarray(Image.fromarray(image[..., k]).resize((SIZE, SIZE), Image.Resampling.BOX)) for k in
              range(image.shape[-1])]  # fmt: skip
    return np.stack(planes)


def test_a_pair_is_a_physical_edit_of_one_photo_toward_anothers_parameters_with_the_other_as_target(home):
    store = Store(home)
    records, fit_doc, model, fit = album_fit(store)
    data = person_data(store, "astro", SIZE, pairs=True)
    count = len(records)
    cross = [(a, b) for a in range(count) for b in range(count) if a != b and pair_turn(fit, a, b) <= 20.0]
    assert data.photos == count and data.cross == 2 * len(cross) and len(data) == 2 * len(cross) + count
    rows = [(a, b, b) for a, b in cross] + [(a, b, a) for a, b in cross] + [(a, a, a) for a in range(count)]
    assert [tuple(p) for p in data.pairs.tolist()] == rows
    # one cross pair checked against the physical edit made directly, at the crop's size
    row = 1
    a, b = cross[row]
    crop = read_photo(store.person_dir("astro") / records[a].aligned).pixels
    points = crop_landmarks(read_face(store, "astro", records[a]))
    edit = physical_edit(crop, np.eye(2, 3), fit_doc["crop_size"], model, fit.select([a]), fit.select([b]),
                         landmarks=points)  # fmt: skip
    unseen = np.round(edit.fill * 255).astype(np.uint8)
    want = box(np.dstack([edit.image, unseen]))
    assert np.array_equal(data.edits[row].numpy(), want)
    assert (edit.image != crop).any()  # the two photos' parameters differ: the edit did something
    # and the same edit edited back toward A's parameters, with A as its target
    back = physical_edit(edit.image, np.eye(2, 3), fit_doc["crop_size"], model, fit.select([b]), fit.select([a]),
                         landmarks=crop_landmarks(read_face(store, "astro", records[b])))  # fmt: skip
    filled = np.round(np.maximum(back.fill, edit.fill) * 255).astype(np.uint8)
    assert np.array_equal(data.edits[len(cross) + row].numpy(), box(np.dstack([back.image, filled])))
    back_image, _ = data.take(torch.tensor([len(cross) + row]))
    assert torch.equal(back_image[0], data.images[a])
    image, condition = data.take(torch.tensor([row]))
    assert torch.equal(image[0], data.images[b])  # the target is the real B
    assert condition.shape == (1, 13, SIZE, SIZE)
    assert torch.equal(condition[0, :9], data.buffers[b])  # rendered from B's parameters
    assert torch.allclose(condition[0, 9:12], torch.from_numpy(want[:3]).float() / 127.5 - 1)
    assert torch.allclose(condition[0, 12], torch.from_numpy(want[3]).float() / 255)
    # each photo with itself: its own crop as the edit, nothing filled, itself as the target
    own_image, own = data.take(torch.tensor([2 * len(cross)]))
    assert torch.equal(own_image[0], data.images[0]) and torch.equal(own[0, 9:12], data.images[0])
    assert own[0, 12].abs().sum() == 0


def test_pairs_are_cached_deterministic_bounded_by_the_turn_and_not_mixed_with_augment(home, monkeypatch):
    store = Store(home)
    first = person_data(store, "astro", SIZE, pairs=True)
    plain = person_data(store, "astro", SIZE)
    assert plain.pairs is None and plain.data_hash != first.data_hash
    for cache in (store.person_dir("astro") / "cache").glob("train-*.safetensors"):
        cache.unlink()
    again = person_data(store, "astro", SIZE, pairs=True)
    assert again.data_hash == first.data_hash
    assert torch.equal(again.edits, first.edits) and torch.equal(again.pairs, first.pairs)
    # the turn bound leaves pairs out (and is part of the cache's key)
    _, _, _, fit = album_fit(store)
    turns = sorted({round(pair_turn(fit, a, b), 6) for a, b, _ in first.pairs.tolist() if a != b})
    assert len(turns) > 1, "the album's photos should differ in pose"
    monkeypatch.setattr(training_data, "MAX_PAIR_TURN", float(np.median(turns)))
    fewer = person_data(store, "astro", SIZE, pairs=True)
    assert fewer.data_hash != first.data_hash and 0 < fewer.cross < first.cross
    with pytest.raises(RigError, match="augment"):
        person_data(store, "astro", SIZE, pairs=True, augment=Augment(copies=2))


def test_training_on_pairs_draws_each_photo_with_itself_at_its_share_and_resumes_bit_for_bit(home, tmp_path):
    store = Store(home)
    data = person_data(store, "astro", SIZE, pairs=True)
    rows = draw_rows(data, TrainConfig(batch=4000, self_share=0.25), torch.Generator().manual_seed(0))
    share = float((rows >= data.cross).float().mean())
    assert abs(share - 0.25) < 0.03 and int(rows.max()) < len(data) and len(set(rows.tolist())) == len(data)
    cfg = TrainConfig(steps=4, batch=2, lr=1e-3, checkpoint_every=2, preview_every=4, log_every=1)
    torch.manual_seed(0)
    start = DiffusionRig(preset("tiny", edit_channels=4))
    whole = train(_copy(start), data, cfg, tmp_path / "a", {})

    def interrupt(step: int, loss: float) -> None:
        if step == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_copy(start), data, cfg, tmp_path / "b", {}, on_step=interrupt)
    resumed = train(_copy(start), data, cfg, tmp_path / "b", {})
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # it learnt to use the edit: its input convolution is no longer zero
    assert whole.denoisingUNet.edit_in.weight.abs().sum() > 0
    assert (tmp_path / "a" / "preview-0000004.png").is_file()


def _copy(model: DiffusionRig) -> DiffusionRig:
    fresh = DiffusionRig(model.cfg)
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_a_conditioned_models_no_op_returns_the_photo_and_its_edit_differs_from_the_physical_one(home, album, tmp_path):
    """A conditioned model, its edit input set to non-zero weights: a no-op edit is the photo bit for bit
    at any strength (the edit's condition is the photo's own, and both branches cancel); a turn is the
    physical edit at strength 0 and something else at 0.5 and 1, where the model is told what is new."""
    store = Store(home)
    base, info = load_model(store.model_dir("astro"))
    wide = widened(base)
    torch.manual_seed(1)
    torch.nn.init.normal_(wide.denoisingUNet.edit_in.weight, std=0.05)
    folder = home / "conditioned"
    save_model(folder, wide, info)
    editor = Editor(store, "astro", model_dir=folder)
    assert editor.conditioned and not Editor(store, "astro").conditioned
    # at three times the size, so that the crop is a reduction of the photo (``warp``'s box filter)
    path = tmp_path / "large.png"
    photo = Image.open(album[0].path).convert("RGB")
    photo.resize((3 * photo.width, 3 * photo.height), Image.Resampling.BICUBIC).save(path)
    for strength in (0.5, 1.0):
        (same,) = edit_photos(editor, [path], Controls(), steps=4, strength=strength)
        assert np.array_equal(same.photo_output, same.prepared.pixels), strength
    outputs = {}  # a turn: surface the photo never showed, which only the edit's mask tells the model
    for strength in (0.0, 0.5, 1.0):
        (turned,) = edit_photos(editor, [path], Controls(yaw=12), steps=4, strength=strength)
        outputs[strength] = turned.photo_output.astype(int)
    assert np.array_equal(outputs[0.0], turned.physical.image)
    moved = {s: int(np.abs(outputs[s] - outputs[0.0]).max()) for s in (0.5, 1.0)}
    print("largest change from the physical edit, levels:", moved)
    assert moved[0.5] > 2 and moved[1.0] > 2
    # and the paper's edit at the model's size runs with the edit as its condition
    (paper,) = edit_photos(editor, [path], Controls(yaw=12), steps=3)
    assert paper.output.shape == (SIZE, SIZE, 3)
    with pytest.raises(RigError, match="physical edit"):
        from rigcli.diffusion.unet import paper_arguments

        paper_arguments(editor.model.cfg)
