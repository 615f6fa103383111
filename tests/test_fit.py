"""Fitting against synthetic ground truth, and on the real astronaut photo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rigcli.demo import astronaut, similarity, transform_image
from rigcli.estimate.landmarks import fit_landmarks, fit_light, interocular, project_landmarks, silhouette_candidates
from rigcli.face.params import FaceFit
from rigcli.image.align import align_face, apply_affine, invert_affine
from rigcli.render.buffers import dominant_direction, light_from_direction, rasterize_fit, render_buffers

DEG = math.pi / 180
STRONG = [["jawOpen"], ["mouthSmile_L", "mouthSmile_R"], ["eyeBlink_L", "eyeBlink_R"]]


@pytest.fixture(scope="module")
def synthetic(face_model):
    """An album of 12 renders of one random identity: known pose, strong expressions, landmarks + 1 px noise."""
    g = torch.Generator().manual_seed(3)
    batch = 12
    yaw = (torch.rand(batch, generator=g) * 2 - 1) * 35 * DEG
    pitch = (torch.rand(batch, generator=g) * 2 - 1) * 20 * DEG
    roll = (torch.rand(batch, generator=g) * 2 - 1) * 20 * DEG
    names = face_model.expression_names
    expression = torch.zeros(batch, len(names))
    for i in range(batch):
        for name in STRONG[i % 3]:
            expression[i, names.index(name)] = 0.8
    identity = torch.randn(100, generator=g) * 0.7
    # the scale and placement the fit finds on the real astronaut's 256 px crop (9.4 px/cm)
    translation = torch.tensor([128.0, 158.0]) + torch.randn(batch, 2, generator=g) * 4
    truth = FaceFit(yaw, pitch, roll, torch.full((batch,), 9.4), translation, expression, identity)
    clean = project_landmarks(face_model, truth, silhouette_candidates(face_model))
    noisy = clean + torch.randn(batch, 68, 2, generator=g)
    return truth, noisy, fit_landmarks(face_model, noisy)


def test_synthetic_pose_is_recovered(synthetic):
    truth, landmarks, fit = synthetic
    for got, want in ((fit.yaw, truth.yaw), (fit.pitch, truth.pitch), (fit.roll, truth.roll)):
        errors = (got - want).abs() / DEG
        assert errors.median() < 2.0 and errors.max() < 5.0
    assert 70 < interocular(landmarks).mean() < 90  # outer eye corners ~84 px apart frontally, less turned
    assert fit.landmark_error.max() < 0.04  # 1 px noise is ~0.015 of that distance per coordinate


def test_synthetic_strong_expressions_are_recovered(synthetic, face_model):
    truth, _, fit = synthetic
    names = face_model.expression_names
    for k, group in enumerate(STRONG):
        photos = list(range(k, len(truth), 3))
        errors = torch.tensor([abs(fit.expression[i, names.index(n)].item() - 0.8) for i in photos for n in group])
        assert errors.median() < 0.15, (group, errors)
        assert errors.max() < 0.3, (group, errors)
        # and a photo without this expression does not get it
        others = [i for i in range(len(truth)) if i % 3 != k]
        assert fit.expression[others][:, [names.index(n) for n in group]].median() < 0.1


def test_fixed_identity_fit_of_one_photo(synthetic, face_model):
    truth, landmarks, album_fit = synthetic
    single = fit_landmarks(face_model, landmarks[4:5], identity=album_fit.identity)
    assert torch.equal(single.identity, album_fit.identity)
    assert abs(single.yaw - truth.yaw[4]).item() / DEG < 2.0
    assert single.landmark_error.item() < 0.04


def test_light_direction_is_recovered_from_the_shaded_buffer(synthetic, face_model):
    truth, _, _ = synthetic
    scene = truth.select([0, 1, 2, 3])
    directions = torch.tensor([[-0.7, 0.2, 0.7], [0.6, 0.5, 0.6], [0.0, -0.6, 0.8], [0.3, 0.1, 0.95]])
    scene.light = torch.stack([light_from_direction(d, 0.8, 0.3).float() for d in directions])
    scene.albedo = torch.tensor([[0.8, 0.6, 0.5], [0.5, 0.4, 0.35], [0.9, 0.75, 0.7], [0.6, 0.45, 0.3]])
    buffers = render_buffers(face_model, scene, 256)
    shaded = buffers[:, :3].permute(0, 2, 3, 1)
    light, albedo = fit_light(face_model, scene, shaded)
    got = dominant_direction(light.double())
    want = torch.nn.functional.normalize(directions.double(), dim=1)
    angles = torch.rad2deg(torch.acos((got * want).sum(1).clamp(-1, 1)))
    assert angles.max() < 10.0, angles
    # albedo x light is what the pixels determine, and it is recovered
    assert torch.allclose(albedo[:, None, :] * light, scene.albedo[:, None, :] * scene.light, atol=0.02)
    # the albedo is the mean skin colour under the fitted light: shading averages 1 there
    refit = scene.select([0, 1, 2, 3])
    refit.light, refit.albedo = light, albedo
    again = render_buffers(face_model, refit, 256)[:, :3]
    eyes = (face_model.regions["eyeball_left"] | face_model.regions["eyeball_right"]).float()
    geometry = rasterize_fit(face_model, refit, 256)
    eye_px = geometry.fragments.interpolate(eyes[None, :, None].expand(4, -1, 1), face_model.triangles)[..., 0] > 0
    skin_px = (geometry.fragments.mask & ~eye_px)[:, None].expand(-1, 3, -1, -1)  # eyes keep a fixed albedo
    assert (again - buffers[:, :3])[skin_px].abs().max() < 0.01


def test_buffers_layout(synthetic, face_model):
    truth, _, _ = synthetic
    scene = truth.select([0])
    scene.light = light_from_direction(torch.tensor([0.0, 0.0, 1.0]), 0.6, 0.4)[None].float()
    scene.albedo = torch.tensor([[0.7, 0.5, 0.4]])
    buffers = render_buffers(face_model, scene, 256)
    assert buffers.shape == (1, 9, 256, 256)
    mask = rasterize_fit(face_model, scene, 256).fragments.mask[0]
    assert buffers[0, :, ~mask].abs().max() == 0  # background is zero
    normals = buffers[0, 3:6, mask]
    assert torch.allclose(normals.norm(dim=0), torch.ones(()), atol=1e-3)
    assert (normals[2] > -0.2).float().mean() > 0.95  # visible surfaces face the camera
    skin = buffers[0, 6:9, mask]
    assert torch.allclose(skin.median(dim=1).values, scene.albedo[0], atol=1e-4)


# ---------------------------------------------------------------- the real photo


def crop_landmarks(analyzer, rgb):
    face = analyzer.find_face(rgb)
    aligned = align_face(rgb, face.landmarks, 256)
    return torch.tensor(apply_affine(invert_affine(aligned.crop_to_photo), face.landmarks), dtype=torch.float32)


@pytest.fixture(scope="module")
def astronaut_fits(face_model, analyzer):
    """The astronaut, rotated +-10 degrees, rescaled, and mirrored, fitted as one album."""
    source = astronaut()
    variants = {"original": source}
    for name, (scale, degrees, mirror) in {
        "rot+10": (1.0, 10, False),
        "rot-10": (1.0, -10, False),
        "scale1.6": (1.6, 0, False),
        "scale0.7": (0.7, 0, False),
        "mirror": (1.0, 0, True),
    }.items():
        matrix = similarity(scale, degrees, mirror)
        size = round(512 * scale)
        matrix[:, 2] = np.array([size / 2, size / 2]) - matrix[:, :2] @ np.array([256.0, 256.0])
        variants[name] = transform_image(source, matrix, size, size)
    names = list(variants)
    landmarks = torch.stack([crop_landmarks(analyzer, variants[n]) for n in names])
    fit = fit_landmarks(face_model, landmarks)
    return {n: fit.select([i]) for i, n in enumerate(names)}


def pose_deg(fit: FaceFit) -> np.ndarray:
    return np.degrees([fit.yaw.item(), fit.pitch.item(), fit.roll.item()])


def test_real_photo_pose_is_stable_under_rotation_and_scale(astronaut_fits):
    base = pose_deg(astronaut_fits["original"])
    for name in ("rot+10", "rot-10", "scale1.6", "scale0.7"):
        assert np.abs(pose_deg(astronaut_fits[name]) - base).max() < 1.5, (name, pose_deg(astronaut_fits[name]), base)


def test_real_photo_mirrored_flips_yaw(astronaut_fits):
    yaw, mirrored = pose_deg(astronaut_fits["original"])[0], pose_deg(astronaut_fits["mirror"])[0]
    assert abs(yaw + mirrored) < 3.0, (yaw, mirrored)
    assert abs(pose_deg(astronaut_fits["original"])[1] - pose_deg(astronaut_fits["mirror"])[1]) < 1.5


def test_real_photo_landmark_error(astronaut_fits):
    for name, fit in astronaut_fits.items():
        assert fit.landmark_error.item() < 0.05, name
