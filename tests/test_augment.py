"""Augmented training pairs (issue 15): copies of album photos made by the physical edit, each with
the buffers of the parameters it was made with; cached, deterministic, drawn and mirrored in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rigcli.enroll import add_photos, read_fit
from rigcli.estimate.landmarks import fit_light
from rigcli.evaluate.metrics import light_error_deg
from rigcli.face.params import FaceFit, fit_from_json, rescale_fit
from rigcli.face.registry import face_model_name, load_face_model
from rigcli.render.buffers import dominant_direction, light_direction, rasterize_fit, render_buffers, skin_mask
from rigcli.store import Store
from rigcli.train.data import Augment, augmented_pairs, person_data
from rigcli.train.loop import TrainConfig, draw_rows, flip_pairs
from tests.conftest import home_with_model

SIZE = 64


@pytest.fixture(scope="module")
def home(tmp_path_factory, album):
    home = home_with_model(tmp_path_factory.mktemp("augment"))
    add_photos(Store(home), "astro", [p.path for p in album[:3]])
    return home


def records_and_fit(store: Store):
    fit_doc = read_fit(store, "astro")
    records = [r for r in store.load("astro").photos if r.id in fit_doc["photos"]]
    return records, fit_doc


def test_an_augmented_copy_shows_the_light_it_was_made_with_and_its_buffers_render_its_parameters(home):
    store = Store(home)
    records, fit_doc = records_and_fit(store)
    model = load_face_model(store, face_model_name(fit_doc))
    crop_size = fit_doc["crop_size"]
    augment = Augment(copies=3, seed=1)
    images, buffers, fits = augmented_pairs(store, "astro", records, fit_doc, crop_size, augment)
    assert images.shape == (3 * len(records), 3, crop_size, crop_size) and len(fits) == images.shape[0]
    own = fit_from_json([fit_doc["photos"][r.id] for r in records], fit_doc["identity"], model.expression_names)
    asked = FaceFit.cat(fits)
    # the light the copy shows, fitted again on its pixels with the geometry it was made with, and
    # compared with the light it was made with over the copy's visible skin (as rig eval compares)
    shown, _ = fit_light(model, asked, ((images.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1))
    geometry = rasterize_fit(model, asked, crop_size)
    skin = skin_mask(model, geometry)
    own_geometry = rasterize_fit(model, own, crop_size)
    own_skin = skin_mask(model, own_geometry)
    errors, moved = [], []
    for k in range(len(fits)):
        normals = geometry.normals[k][skin[k]]
        errors.append(light_error_deg(shown[k], asked.light[k], normals))
        i = k // 3  # how far each copy's light is from its photo's, each as its own skin shows it
        before = light_direction(own.light[i], own_geometry.normals[i][own_skin[i]])
        cos = (before * light_direction(asked.light[k], normals)).sum().clamp(-1, 1)
        moved.append(float(torch.rad2deg(torch.acos(cos))))
    print("re-fitted light error per copy (deg):", np.round(errors, 1), "moved from the photo's:", np.round(moved, 1))
    assert max(moved) > 40.0  # the copies do relight
    assert max(errors) < 15.0  # and each shows the light it was made with (measured: at most about 7)
    # their buffers are a fresh render of their parameters, at the training size too (through the cache)
    assert torch.allclose(buffers, render_buffers(model, asked, crop_size), atol=1e-5)
    data = person_data(store, "astro", SIZE, augment=augment)
    assert (data.photos, data.copies, len(data)) == (len(records), 3, 4 * len(records))
    small = render_buffers(model, rescale_fit(asked, crop_size, SIZE), SIZE)
    for i in range(len(records)):
        for j in range(3):
            row = int(data.groups[i, j + 1])
            assert torch.allclose(data.buffers[row], small[3 * i + j], atol=1e-5), (i, j)
    # the expression or the pose changed too in some copies, never beyond the bounds
    turn = np.degrees((asked.yaw - own.yaw.repeat_interleave(3)).abs().numpy())
    assert turn.max() <= augment.max_yaw + 1e-3 and turn.max() > 0.5
    assert not torch.equal(dominant_direction(asked.light[0]), dominant_direction(own.light[0]))
    assert rasterize_fit(model, asked, crop_size).fragments.mask.any()


def test_augmented_data_is_deterministic_under_the_seed_and_keyed_like_the_cache(home):
    store = Store(home)
    first = person_data(store, "astro", SIZE, augment=Augment(copies=2, seed=5))
    for cache in (store.person_dir("astro") / "cache").glob("train-*.safetensors"):
        cache.unlink()
    again = person_data(store, "astro", SIZE, augment=Augment(copies=2, seed=5))
    assert torch.equal(first.images, again.images) and torch.equal(first.buffers, again.buffers)
    assert first.data_hash == again.data_hash
    other = person_data(store, "astro", SIZE, augment=Augment(copies=2, seed=6))
    assert other.data_hash != first.data_hash and not torch.equal(other.images, first.images)
    plain = person_data(store, "astro", SIZE)
    assert plain.groups is None and len(plain) == first.photos
    assert torch.equal(plain.images, first.images[: first.photos])  # the album's rows come first, unchanged


def test_training_draws_copies_at_the_ratio_and_mirrors_buffers_as_a_render_would(home, face_model):
    store = Store(home)
    data = person_data(store, "astro", SIZE, augment=Augment(copies=4, seed=0))
    cfg = TrainConfig(batch=4000, augment_ratio=0.25)
    rows = draw_rows(data, cfg, torch.Generator().manual_seed(0))
    share = float((rows >= data.photos).float().mean())
    assert abs(share - 0.25) < 0.03
    assert torch.equal(rows, draw_rows(data, cfg, torch.Generator().manual_seed(0)))
    # a mirrored sample's buffers are those of the mirrored face: render a frontal fit and its mirror image
    fit = fit_from_json(
        [read_fit(store, "astro")["photos"][store.load("astro").photos[0].id]],
        read_fit(store, "astro")["identity"],
        face_model.expression_names,
    )
    fit = rescale_fit(fit, read_fit(store, "astro")["crop_size"], SIZE)
    buffers = render_buffers(face_model, fit, SIZE)
    image = torch.zeros(1, 3, SIZE, SIZE)
    _, flipped = flip_pairs(image, buffers, torch.tensor([True]))
    mirror = fit.select([0])
    mirror.yaw, mirror.roll = -fit.yaw, -fit.roll
    mirror.translation = torch.stack([SIZE - fit.translation[:, 0], fit.translation[:, 1]], 1)
    rendered = render_buffers(face_model, mirror, SIZE)
    both = (flipped[0, 3:6].abs().sum(0) > 0) & (rendered[0, 3:6].abs().sum(0) > 0)
    cosine = (flipped[0, 3:6] * rendered[0, 3:6]).sum(0)[both]
    print(f"mirrored normals against the mirrored fit's render: median cosine {float(cosine.median()):.3f}")
    assert float(cosine.median()) > 0.9


def test_a_copys_light_turns_at_most_the_bound_along_the_great_circle_towards_the_asked_side():
    from rigcli.train.data import turn_at_most

    front, left = np.array([0.0, 0.0, 1.0]), np.array([-1.0, 0.0, 0.2])
    near = turn_at_most(front, left, 90.0)  # 79 deg away: within the bound, kept as given
    assert near == tuple(left)
    pulled = np.array(turn_at_most(front, left, 60.0))
    assert np.isclose(np.degrees(np.arccos(pulled @ front)), 60.0) and np.isclose(np.linalg.norm(pulled), 1.0)
    assert abs(pulled[1]) < 1e-9 and pulled[0] < 0  # in the plane of the two, on the asked side
    opposite = np.array(turn_at_most(front, -front, 45.0))
    assert np.isclose(np.degrees(np.arccos(opposite @ front)), 45.0)
