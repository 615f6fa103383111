"""FLAME and DECA's encoder on small random FLAME-shaped data (the real FLAME files cannot ship).

References are computed another way: skinning by explicit loops in float64 numpy with each joint
rotating about its own rest position and a dense per-vertex 4x4 transform, rotations by the
matrix exponential of the skew matrix (not Rodrigues' formula), landmarks by hand-written
barycentric sums, contour rows from a table of yaws worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

from rigcli import RigError
from rigcli.estimate.deca import (
    DECA_SPLIT,
    DecaEncoder,
    DecaOrthoCamera,
    deca_crop,
    deca_crop_box,
    deca_crop_transform,
    deca_to_fit,
    decompose,
    estimate_with_deca,
    rotate_light_about_z,
)
from rigcli.estimate.landmarks import fit_landmarks, project_landmarks
from rigcli.face.flame import FlameFaceModel, FlameTexture
from rigcli.face.flame_mesh import Flame, axis_angle_to_matrix, contour_row
from rigcli.face.params import FaceFit
from rigcli.image.align import invert_affine
from rigcli.render.buffers import light_from_direction, rasterize_fit, render_buffers, sh_shading

V, F, J = 60, 90, 5
PARENTS = [-1, 0, 1, 1, 1]  # FLAME: global <- neck <- jaw, eye_left, eye_right


def random_flame(seed: int = 0, n_shape: int = 12, n_exp: int = 9) -> dict[str, torch.Tensor]:
    """Tensors named and laid out as the FLAME import writes them, with FLAME's joint count."""
    rng = np.random.default_rng(seed)
    weights = rng.random((V, J)) ** 3
    weights /= weights.sum(1, keepdims=True)
    regressor = rng.random((J, V))
    regressor /= regressor.sum(1, keepdims=True)
    kintree = np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    bary = rng.random((79, 17, 3)) + 0.1
    static_bary = rng.random((51, 3)) + 0.1
    full_bary = rng.random((1, 68, 3)) + 0.1
    t = {
        "v_template": rng.normal(size=(V, 3)) * 0.1,
        "shapedirs": rng.normal(size=(V, 3, n_shape)) * 0.01,
        "exprdirs": rng.normal(size=(V, 3, n_exp)) * 0.01,
        "posedirs": rng.normal(size=(V, 3, 36)) * 0.01,
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": kintree,
        "faces": rng.integers(0, V, size=(F, 3)),
        "static_lmk_faces_idx": rng.integers(0, F, size=51),
        "static_lmk_bary_coords": static_bary / static_bary.sum(-1, keepdims=True),
        "dynamic_lmk_faces_idx": rng.integers(0, F, size=(79, 17)),
        "dynamic_lmk_bary_coords": bary / bary.sum(-1, keepdims=True),
        "full_lmk_faces_idx": rng.integers(0, F, size=(1, 68)),
        "full_lmk_bary_coords": full_bary / full_bary.sum(-1, keepdims=True),
    }
    # float32 as the import writes them, so float64 references see the very same numbers
    return {k: torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in t.items()}


def skew(w: np.ndarray) -> np.ndarray:
    return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


def reference_flame(t: dict, shape: np.ndarray, expr: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """One mesh by loops: blendshapes, pose correctives, each joint turning about its rest position."""
    g = {k: v.double().numpy() for k, v in t.items()}
    shaped = g["v_template"].copy()
    for v in range(V):
        for c in range(3):
            shaped[v, c] += sum(shape[s] * g["shapedirs"][v, c, s] for s in range(len(shape)))
            shaped[v, c] += sum(expr[e] * g["exprdirs"][v, c, e] for e in range(len(expr)))
    joints = g["J_regressor"] @ shaped
    rots = [expm(skew(pose[j])) for j in range(J)]
    posed = shaped.copy()
    for j in range(1, J):
        for r in range(3):
            for c in range(3):
                coef = rots[j][r, c] - (1.0 if r == c else 0.0)
                posed += coef * g["posedirs"][:, :, 9 * (j - 1) + 3 * r + c]
    world = []
    for j in range(J):
        about = np.eye(4)
        about[:3, :3] = rots[j]
        about[:3, 3] = joints[j] - rots[j] @ joints[j]  # x -> R (x - J) + J
        world.append(about if PARENTS[j] < 0 else world[PARENTS[j]] @ about)
    out = np.empty_like(posed)
    for v in range(V):
        dense = sum(g["weights"][v, j] * world[j] for j in range(J))
        out[v] = (dense @ np.append(posed[v], 1.0))[:3]
    return out


def test_rodrigues_matches_the_matrix_exponential():
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(6, 3)) * np.array([[0.1], [0.5], [1.0], [2.0], [3.0], [1e-9]])
    got = axis_angle_to_matrix(torch.from_numpy(vecs)).numpy()
    for vec, mat in zip(vecs, got, strict=True):
        np.testing.assert_allclose(mat, expm(skew(vec)), atol=1e-12)


def test_skinning_matches_dense_per_vertex_transforms():
    t = random_flame()
    flame = Flame(t, n_shape=100, n_exp=50).double()
    rng = np.random.default_rng(2)
    batch = 3
    shape = rng.normal(size=(batch, 12))
    expr = rng.normal(size=(batch, 9))
    pose = rng.normal(size=(batch, J, 3)) * 0.4
    verts, joints = flame(*(torch.from_numpy(a) for a in (shape, expr, pose)))
    assert verts.shape == (batch, V, 3) and joints.shape == (batch, J, 3)
    for b in range(batch):
        ref = reference_flame(t, shape[b], expr[b], pose[b])
        np.testing.assert_allclose(verts[b].detach().numpy(), ref, atol=1e-10)
    # the posed root joint stays where it was: global rotation turns about it
    g = {k: v.double().numpy() for k, v in t.items()}
    shaped = g["v_template"] + g["shapedirs"] @ shape[0] + g["exprdirs"] @ expr[0]
    np.testing.assert_allclose(joints[0, 0].detach().numpy(), g["J_regressor"][0] @ shaped, atol=1e-12)


def test_float32_forward_is_differentiable_at_rest_pose():
    flame = Flame(random_flame(), n_shape=10, n_exp=5)
    shape = torch.zeros(2, 10, requires_grad=True)
    expr = torch.zeros(2, 5, requires_grad=True)
    pose = torch.zeros(2, J, 3, requires_grad=True)
    verts, _ = flame(shape, expr, pose)
    np.testing.assert_allclose(verts[0].detach().numpy(), random_flame()["v_template"].numpy(), atol=1e-6)
    verts.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in (shape, expr, pose))
    assert flame.n_shape == 10 and flame.n_exp == 5  # only the first components are kept


def yaw_pose(global_deg: float, neck_deg: float = 0.0, batch: int = 1) -> torch.Tensor:
    pose = torch.zeros(batch, J, 3, dtype=torch.float64)
    pose[:, 0, 1] = math.radians(global_deg)
    pose[:, 1, 1] = math.radians(neck_deg)
    return pose


@pytest.mark.parametrize(
    ("global_deg", "neck_deg", "row"),
    [
        (0.2, 0, 0),
        (10.3, 0, 10),
        (20, 15, 35),
        (38.6, 0, 39),
        (55, 0, 39),
        (-10.2, 0, 49),
        (-25, -14, 78),
        (-60, 0, 78),
    ],
)
def test_contour_row_follows_global_and_neck_yaw(global_deg, neck_deg, row):
    flame = Flame(random_flame()).double()
    assert int(flame.contour_rows(yaw_pose(global_deg, neck_deg))[0]) == row


def test_contour_row_rule_by_hand():
    degrees = torch.tensor([0.0, 0.4, 0.6, 39.0, 39.4, 80.0, -0.6, -1.0, -38.6, -39.0, -39.6, -90.0])
    expected = [0, 0, 1, 39, 39, 39, 40, 40, 78, 78, 78, 78]
    assert contour_row(degrees).tolist() == expected


def test_landmarks_are_barycentric_points_and_turning_changes_the_contour():
    t = random_flame()
    flame = Flame(t).double()
    rng = np.random.default_rng(3)
    faces = t["faces"].numpy()
    for yaw in (0.0, 24.7, -17.2):
        pose = yaw_pose(yaw) + torch.from_numpy(rng.normal(size=(1, J, 3)) * 0.01) * torch.tensor([0, 0, 1, 1, 1.0])[
            :, None
        ].to(torch.float64)
        shape = torch.from_numpy(rng.normal(size=(1, 12)))
        verts, _ = flame(shape, torch.zeros(1, 9, dtype=torch.float64), pose)
        lm = flame.landmarks(verts, flame.contour_rows(pose))[0].numpy()
        row = round(yaw) if yaw >= 0 else 39 - round(yaw)
        vn = verts[0].numpy()
        for k in range(68):
            if k < 17:
                f, w = t["dynamic_lmk_faces_idx"][row, k], t["dynamic_lmk_bary_coords"][row, k]
            else:
                f, w = t["static_lmk_faces_idx"][k - 17], t["static_lmk_bary_coords"][k - 17]
            point = sum(float(w[i]) * vn[faces[int(f), i]] for i in range(3))
            np.testing.assert_allclose(lm[k], point, atol=1e-12)
    # the same mesh seen with the head turned uses another contour row, the inner points stay
    verts, _ = flame(torch.zeros(1, 12, dtype=torch.float64), torch.zeros(1, 9, dtype=torch.float64), yaw_pose(0))
    front = flame.landmarks(verts, torch.tensor([0]))
    turned = flame.landmarks(verts, flame.contour_rows(yaw_pose(30)))
    assert not torch.allclose(front[:, :17], turned[:, :17]) and torch.equal(front[:, 17:], turned[:, 17:])
    full = flame.landmarks3d(verts)[0].numpy()
    f, w = int(t["full_lmk_faces_idx"][0, 5]), t["full_lmk_bary_coords"][0, 5].numpy()
    np.testing.assert_allclose(full[5], sum(w[i] * verts[0, faces[f, i]].numpy() for i in range(3)), atol=1e-12)


def test_missing_or_inconsistent_tensors_are_refused():
    t = random_flame()
    with pytest.raises(ValueError, match="posedirs"):
        Flame({**t, "posedirs": t["posedirs"][..., :27]})
    with pytest.raises(ValueError, match="missing"):
        Flame({k: v for k, v in t.items() if k != "weights"})


# ---------------------------------------------------------------- DECA's encoder


def test_decompose_splits_the_code_in_decas_order():
    sizes = dict(DECA_SPLIT)
    assert list(sizes) == ["shape", "tex", "exp", "pose", "cam", "light"]
    assert list(sizes.values()) == [100, 50, 50, 6, 3, 27]
    code = torch.cat([torch.full((2, n), float(i)) for i, n in enumerate(sizes.values())], 1)
    code = code + torch.arange(236.0) / 1000  # each number also says where it was
    parts = decompose(code)
    for i, (name, n) in enumerate(sizes.items()):
        flat = parts[name].reshape(2, -1)
        assert flat.shape == (2, n) and torch.all(flat.floor() == i)
    assert parts["light"].shape == (2, 9, 3)
    assert math.isclose(float(parts["light"][1, 2, 1]), 5 + (209 + 2 * 3 + 1) / 1000, rel_tol=1e-6)
    assert math.isclose(float(parts["cam"][0, 0]), 4 + 206 / 1000, rel_tol=1e-6)  # scale first
    with pytest.raises(ValueError, match="236"):
        decompose(torch.zeros(1, 235))


def deca_e_flame_shapes() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of ``deca_model.tar['E_flame']``, from DECA's ResnetEncoder / resnet.py:
    a torchvision-style ResNet-50 under ``encoder.`` without fc, and ``layers.0`` / ``layers.2``."""

    def bn(prefix: str, n: int) -> dict:
        return {f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")} | {
            f"{prefix}.num_batches_tracked": ()
        }

    shapes = {"encoder.conv1.weight": (64, 3, 7, 7), **bn("encoder.bn1", 64)}
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), 1):
        for b in range(blocks):
            p = f"encoder.layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            shapes |= bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes |= bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            shapes |= bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                shapes |= bn(f"{p}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    shapes |= {"layers.0.weight": (1024, 2048), "layers.0.bias": (1024,)}
    shapes |= {"layers.2.weight": (236, 1024), "layers.2.bias": (236,)}
    return shapes


def test_encoder_loads_decas_state_dict_strictly_and_runs():
    gen = torch.Generator().manual_seed(4)
    state = {}
    for key, shape in deca_e_flame_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    encoder = DecaEncoder.from_state_dict(state)
    assert not encoder.training
    assert torch.equal(
        encoder.state_dict()["encoder.layer3.5.bn2.running_var"], state["encoder.layer3.5.bn2.running_var"]
    )
    encoder.eval()
    images = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        code = encoder(images)
        features = encoder.encoder(images)
    assert code.shape == (2, 236) and features.shape == (2, 2048) and torch.isfinite(code).all()
    hidden = torch.relu(features @ state["layers.0.weight"].T + state["layers.0.bias"])
    torch.testing.assert_close(code, hidden @ state["layers.2.weight"].T + state["layers.2.bias"])


def test_a_state_dict_that_is_not_e_flame_is_refused_with_the_keys():
    state = {k: torch.zeros(v) for k, v in deca_e_flame_shapes().items()}
    with pytest.raises(RigError, match=r"missing: layers\.2\.bias"):
        DecaEncoder.from_state_dict({k: v for k, v in state.items() if k != "layers.2.bias"})
    with pytest.raises(RigError, match=r"wrong shape: layers\.2\.weight"):
        DecaEncoder.from_state_dict({**state, "layers.2.weight": torch.zeros(239, 1024)})
    with pytest.raises(RigError, match=r"unexpected: encoder\.fc\.weight"):
        DecaEncoder.from_state_dict({**state, "encoder.fc.weight": torch.zeros(1000, 2048)})


def test_crop_box_and_resampling_by_hand():
    landmarks = np.array([[100.0, 90.0], [300.0, 50.0], [180.0, 210.0], [250.0, 120.0]])
    centre, side = deca_crop_box(landmarks)
    # box 200 x 160: mean side 180, x 1.1 = 198, x 1.25 = 247.5, truncated to 247
    np.testing.assert_allclose(centre, [200.0, 130.0])
    assert side == 247.0
    to_crop = deca_crop_transform(landmarks)
    corners = np.array([[200 - 123.5, 130 - 123.5, 1.0], [200 + 123.5, 130 + 123.5, 1.0]])
    np.testing.assert_allclose(corners @ to_crop.T, [[0.0, 0.0], [223.0, 223.0]], atol=1e-9)
    # a photo whose red channel is 0.6 x and green 0.8 y: the crop reads back the photo positions
    ys, xs = np.mgrid[0:300, 0:400].astype(np.float64)
    photo = np.stack([0.6 * xs, 0.8 * ys, np.full_like(xs, 40.0)], 2).round().astype(np.uint8)
    crop, matrix = deca_crop(photo, landmarks)
    assert crop.shape == (3, 224, 224) and np.allclose(matrix, to_crop)
    u = np.arange(224)
    expect_x = 200 - 123.5 + u * 247 / 223
    np.testing.assert_allclose(crop[0, 100].numpy() * 255, 0.6 * expect_x, atol=1.01)
    np.testing.assert_allclose(crop[1, :, 50].numpy() * 255, 0.8 * (130 - 123.5 + u * 247 / 223), atol=1.01)
    assert float(crop[2].min()) == float(crop[2].max()) == pytest.approx(40 / 255)


def test_orthographic_camera_by_hand():
    camera = DecaOrthoCamera.from_code(torch.tensor([[2.0, 0.1, -0.2]]))
    pixels = camera.to_pixels(torch.tensor([[[0.3, 0.4, 5.0]]]), 224)
    # s (X + t) = (0.8, 0.4); y flipped: (0.8, -0.4); pixels (1 + ndc) * 112
    torch.testing.assert_close(pixels, torch.tensor([[[201.6, 67.2]]]))


# ---------------------------------------------------------------- FLAME as the fitter's face model


def test_flame_face_model_follows_the_face_model_interface():
    t = random_flame()
    model = FlameFaceModel.from_tensors(t, "flame-test", n_shape=12, n_exp=9)
    assert model.identity_size == 12 and model.vertex_count == V and model.model_id == "flame-test"
    assert len(model.expression_names) == 12 and model.expression_names[9:] == ["jawPitch", "jawYaw", "jawRoll"]
    g = torch.Generator().manual_seed(5)
    identity, expression = torch.randn(12, generator=g), torch.randn(2, 12, generator=g) * 0.3
    pose = torch.zeros(2, J, 3)
    pose[:, 2] = expression[:, 9:]  # the last three numbers are the jaw joint's axis-angle
    expect, _ = Flame(t, n_shape=12, n_exp=9)(identity.expand(2, -1), expression[:, :9], pose)
    got = model.vertices(identity, expression)
    torch.testing.assert_close(got, 100 * expect)  # centimetres
    index = torch.tensor([3, 17, 42])
    torch.testing.assert_close(model.vertices(identity, expression, index), got[:, index])
    # landmarks for a head turned 25 degrees by the fitter's camera use contour row 25
    turn = axis_angle_to_matrix(torch.tensor([[0.0, math.radians(25.2), 0.0]]))
    points = model.landmark_points(identity, expression[:1], turn)
    torch.testing.assert_close(points, model.flame.landmarks(got[:1], torch.tensor([25])))
    # per landmark, the corner of its triangle with the largest barycentric weight (frontal row)
    faces = t["faces"].numpy()
    for k in (0, 16, 30, 67):
        f, w = (
            (t["dynamic_lmk_faces_idx"][0, k], t["dynamic_lmk_bary_coords"][0, k])
            if k < 17
            else (t["static_lmk_faces_idx"][k - 17], t["static_lmk_bary_coords"][k - 17])
        )
        assert int(model.landmark_vertices[k]) == faces[int(f), int(np.argmax(w.numpy()))]
    owner = t["weights"].numpy().argmax(1)
    eyes = {j: owner == j for j in (3, 4)}
    left = 3 if t["v_template"].numpy()[eyes[3], 0].mean() > t["v_template"].numpy()[eyes[4], 0].mean() else 4
    assert np.array_equal(model.regions["eyeball_left"].numpy(), eyes[left])
    assert np.array_equal(model.regions["eyeball_right"].numpy(), eyes[7 - left])
    assert not (model.regions["face"] & model.regions["eyeball_left"]).any()
    assert (model.regions["narrow_face"] <= model.regions["face"]).all()
    moved = model.to("cpu")
    assert moved.flame is not model.flame and moved.model_id == model.model_id
    torch.testing.assert_close(moved.vertices(identity, expression), got)
    prior = model.expression_prior(expression)
    expect_prior = 1e-4 * (expression[:, :9] ** 2).sum(1) + (
        torch.tensor([1e-4, 1e-2, 1e-2]) * expression[:, 9:] ** 2
    ).sum(1)
    torch.testing.assert_close(prior, expect_prior)


def test_fitter_recovers_pose_and_jaw_of_a_flame_head():
    t = random_flame(seed=6)
    # one contour for every yaw, so the synthetic loss has no jumps; the table's lookup is tested above
    t["dynamic_lmk_faces_idx"] = t["dynamic_lmk_faces_idx"][:1].expand(79, -1).clone()
    t["dynamic_lmk_bary_coords"] = t["dynamic_lmk_bary_coords"][:1].expand(79, -1, -1).clone()
    model = FlameFaceModel.from_tensors(t, "flame-test", n_shape=12, n_exp=9)
    g = torch.Generator().manual_seed(7)
    batch = 3
    expression = torch.cat([torch.randn(batch, 9, generator=g) * 0.5, torch.zeros(batch, 3)], 1)
    expression[:, 9] = torch.tensor([0.05, 0.2, 0.35])  # the jaw opens further in each photo
    truth = FaceFit(
        yaw=torch.tensor([0.3, -0.2, 0.1]),
        pitch=torch.tensor([-0.1, 0.05, 0.15]),
        roll=torch.tensor([0.05, -0.1, 0.0]),
        scale=torch.tensor([2.0, 2.4, 1.8]),
        translation=torch.tensor([[120.0, 130.0], [128.0, 125.0], [135.0, 128.0]]),
        expression=expression,
        identity=torch.randn(12, generator=g) * 0.5,
    )
    landmarks = project_landmarks(model, truth, None)
    fit = fit_landmarks(model, landmarks, steps=150)
    assert float(fit.landmark_error.max()) < 0.01
    assert (fit.expression[:, 9] - expression[:, 9]).abs().max() < 0.03
    for got, want in ((fit.yaw, truth.yaw), (fit.pitch, truth.pitch), (fit.roll, truth.roll)):
        assert (got - want).abs().max() < math.radians(1.5)
    assert (fit.expression < 0).any()  # PCA coefficients are not clamped to ICT's [0, 1]


# ---------------------------------------------------------------- DECA's estimate as a fit


def test_rotated_light_shades_rotated_normals_alike():
    g = torch.Generator().manual_seed(8)
    normals = torch.nn.functional.normalize(torch.randn(2, 50, 3, generator=g, dtype=torch.float64), dim=-1)
    light = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    angle = torch.tensor([0.4, -1.1], dtype=torch.float64)
    c, s = torch.cos(angle), torch.sin(angle)
    turn = torch.zeros(2, 3, 3, dtype=torch.float64)
    turn[:, 0, 0], turn[:, 0, 1], turn[:, 1, 0], turn[:, 1, 1], turn[:, 2, 2] = c, -s, s, c, 1
    turned = normals @ turn.transpose(1, 2)
    torch.testing.assert_close(sh_shading(turned, rotate_light_about_z(light, angle)), sh_shading(normals, light))


def similarity_2x3(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array(
        [[scale * math.cos(a), -scale * math.sin(a), shift[0]], [scale * math.sin(a), scale * math.cos(a), shift[1]]]
    )


@pytest.mark.parametrize("angle_deg", [0.0, 17.0])
def test_deca_parameters_become_a_fit_with_the_same_landmarks(angle_deg):
    """DECA's own chain (FLAME posed about its root joint, orthographic camera in the 224 crop, crop
    mapped to the frame) and the fitter's (rotation about the origin, weak perspective) agree."""
    t = random_flame(seed=9)
    model = FlameFaceModel.from_tensors(t, "flame-test", n_shape=12, n_exp=9)
    g = torch.Generator().manual_seed(10)
    batch = 3
    code = torch.randn(batch, 236, generator=g) * 0.3
    code[:, 200:203] = torch.tensor([[0.1, 0.5, -0.1], [-0.05, -0.3, 0.2], [0.3, 0.1, 0.05]])  # global pose
    code[:, 206] = torch.tensor([7.0, 9.0, 8.0])  # camera scale
    params = decompose(code)
    crop_to_frame = similarity_2x3(angle_deg, 1.3, (-20.0, 35.0))
    fit = deca_to_fit(model, params, crop_to_frame, shared_identity=False)

    flame = model.flame
    full = flame.full_pose(params["pose"])
    verts, _ = flame(params["shape"][:, :12], params["exp"][:, :9], full)
    points = flame.landmarks(verts, flame.contour_rows(full))
    crop_px = DecaOrthoCamera.from_code(params["cam"]).to_pixels(points, 224).double().numpy()
    expect = crop_px @ crop_to_frame[:, :2].T + crop_to_frame[:, 2]
    got = project_landmarks(model, fit, None).double().numpy()
    np.testing.assert_allclose(got, expect, atol=2e-3)
    torch.testing.assert_close(fit.expression[:, 9:], params["pose"][:, 3:])
    torch.testing.assert_close(fit.expression[:, :9], params["exp"][:, :9])
    shared = deca_to_fit(model, params, crop_to_frame)
    torch.testing.assert_close(shared.identity, params["shape"][:, :12].mean(0))
    if angle_deg == 0:
        torch.testing.assert_close(fit.light, params["light"])  # the crop is axis-aligned: light as DECA gave it


def dome_flame(n: int = 21) -> dict[str, torch.Tensor]:
    """A renderable FLAME-shaped head: a dome facing +z (metres), triangles counter-clockwise from the
    front, 68 landmarks on a face-like layout, the jaw joint skinning the lower third."""
    t = random_flame(seed=11)
    lin = np.linspace(-0.08, 0.08, n)
    x, y = np.meshgrid(lin, lin)  # row i: y, column j: x
    z = np.sqrt(np.clip(0.15**2 - x**2 - y**2, 0, None)) - 0.1
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel(), idx[1:, :-1].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    layout = np.concatenate(
        [
            np.stack([0.8 * np.cos(th := np.linspace(np.pi * 1.05, np.pi * 1.95, 17)), 0.9 * np.sin(th)], 1),
            np.stack([np.linspace(-0.6, -0.15, 5), np.full(5, 0.5)], 1),
            np.stack([np.linspace(0.15, 0.6, 5), np.full(5, 0.5)], 1),
            np.stack([np.zeros(4), np.linspace(0.35, 0.0, 4)], 1),
            np.stack([np.linspace(-0.15, 0.15, 5), np.full(5, -0.1)], 1),
            *[np.stack([cx + 0.12 * np.cos(e := np.linspace(0, 2 * np.pi, 7)[:-1]), 0.3 + 0.05 * np.sin(e)], 1)
              for cx in (-0.35, 0.35)],
            np.stack([0.3 * np.cos(m := np.linspace(0, 2 * np.pi, 13)[:-1]), -0.45 + 0.12 * np.sin(m)], 1),
            np.stack([0.18 * np.cos(m := np.linspace(0, 2 * np.pi, 9)[:-1]), -0.45 + 0.05 * np.sin(m)], 1),
        ]
    ) * 0.07  # fmt: skip
    centroids = verts[faces].mean(1)[:, :2]
    nearest = np.argmin(((layout[:, None] - centroids[None]) ** 2).sum(-1), 1)
    third = np.full((68, 3), 1 / 3)
    weights = np.zeros((n * n, J))
    jaw = verts[:, 1] < -0.03
    weights[~jaw, 0] = 1
    weights[jaw, 0], weights[jaw, 2] = 0.3, 0.7
    regressor = np.zeros((J, n * n))
    regressor[:, idx[n // 2, n // 2]] = 1
    regressor[2] = 0
    regressor[2, idx[n // 4, n // 2]] = 1
    rng = np.random.default_rng(12)
    t |= {
        "v_template": torch.from_numpy(verts.astype(np.float32)),
        "shapedirs": torch.from_numpy((rng.normal(size=(n * n, 3, 4)) * 0.001).astype(np.float32)),
        "exprdirs": torch.from_numpy((rng.normal(size=(n * n, 3, 3)) * 0.001).astype(np.float32)),
        "posedirs": torch.zeros(n * n, 3, 36),
        "J_regressor": torch.from_numpy(regressor.astype(np.float32)),
        "weights": torch.from_numpy(weights.astype(np.float32)),
        "faces": torch.from_numpy(faces),
        "static_lmk_faces_idx": torch.from_numpy(nearest[17:]),
        "static_lmk_bary_coords": torch.from_numpy(third[17:].astype(np.float32)),
        "dynamic_lmk_faces_idx": torch.from_numpy(np.tile(nearest[:17], (79, 1))),
        "dynamic_lmk_bary_coords": torch.from_numpy(np.tile(third[:17], (79, 1, 1)).astype(np.float32)),
    }
    return t


class FixedCodes(torch.nn.Module):
    """Stands in for DECA's trained weights (not shippable): returns known codes, records its input."""

    def __init__(self, codes: torch.Tensor) -> None:
        super().__init__()
        self.codes, self.seen = codes, []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        start = sum(len(s) for s in self.seen[:-1])
        return self.codes[start : start + len(images)]


def test_deca_estimate_in_the_aligned_frame_recovers_the_rendered_albedo():
    model = FlameFaceModel.from_tensors(dome_flame(), "flame-dome", n_shape=4, n_exp=3)
    assert model.regions["narrow_face"].sum() > 30  # the layout gives the light fit some skin
    batch, size = 2, 256
    code = torch.zeros(batch, 236)
    code[:, :4] = torch.tensor([[0.5, -0.3, 0.2, 0.1], [-0.4, 0.6, 0.0, 0.3]])
    code[:, 200:206] = torch.tensor([[0.05, 0.25, 0.0, 0.1, 0.0, 0.0], [-0.1, -0.2, 0.05, 0.2, 0.0, 0.0]])
    code[:, 206:209] = torch.tensor([[8.0, 0.01, -0.02], [7.0, -0.01, 0.0]])
    light = torch.stack([light_from_direction(torch.tensor(d), 0.7, 0.4) for d in ([0.3, 0.4, 1.0], [-0.5, 0.1, 1.0])])
    code[:, 209:] = light.float().reshape(batch, 27)
    landmarks = np.stack(
        [np.array([[70.0, 60.0], [190.0, 80.0], [120.0, 200.0]] * 23)[:68] + 3 * i for i in range(batch)]
    )
    to_frame = np.stack([invert_affine(deca_crop_transform(p)) for p in landmarks])
    truth = deca_to_fit(model, decompose(code), to_frame, shared_identity=False)
    truth.albedo = torch.tensor([[0.7, 0.5, 0.4], [0.55, 0.45, 0.35]])
    shaded = render_buffers(model, truth, size)[:, :3].permute(0, 2, 3, 1)
    mask = rasterize_fit(model, truth, size).fragments.mask[..., None]
    photos = ((shaded * mask + 0.5 * ~mask).clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    encoder = FixedCodes(code)
    fit, params = estimate_with_deca(encoder, model, photos, landmarks, shared_identity=False)
    torch.testing.assert_close(params["tex"], code[:, 100:150])
    assert encoder.seen[0].shape == (batch, 3, 224, 224) and float(encoder.seen[0].max()) <= 1.0
    torch.testing.assert_close(fit.scale, truth.scale)
    torch.testing.assert_close(fit.translation, truth.translation)
    torch.testing.assert_close(fit.albedo, truth.albedo, atol=0.01, rtol=0)
    assert fit.landmark_error.shape == (batch,)
    shared, _ = estimate_with_deca(FixedCodes(code), model, photos, landmarks)
    torch.testing.assert_close(shared.identity, code[:, :4].mean(0))


# ---------------------------------------------------------------- texture-space albedo


def test_texture_maps_are_mean_plus_basis_then_nearest_resized():
    g = torch.Generator().manual_seed(13)
    mean, basis = torch.rand(4, 4, 3, generator=g), torch.rand(4, 4, 3, 5, generator=g)
    texture = FlameTexture(mean, basis, torch.zeros(1, 2), torch.zeros(1, 3, dtype=torch.long), n_tex=5, size=2)
    code = torch.randn(2, 5, generator=g)
    maps = texture.maps(code)
    assert maps.shape == (2, 3, 2, 2)
    for b, (i, j), (y, x) in ((0, (1, 0), (2, 0)), (1, (0, 1), (0, 2)), (1, (1, 1), (2, 2))):
        expect = mean[y, x] + sum(code[b, k] * basis[y, x, :, k] for k in range(5))
        torch.testing.assert_close(maps[b, :, i, j], expect)


@pytest.mark.parametrize("reverse", [False, True])
def test_albedo_is_looked_up_at_the_rasterized_uv(reverse):
    t = dome_flame()
    if reverse:  # a file wound the other way: the model turns the triangles, the UV corners must follow
        t["faces"] = t["faces"][:, [0, 2, 1]]
    model = FlameFaceModel.from_tensors(t, "flame-dome", n_shape=4, n_exp=3)
    assert model.winding_flipped == reverse
    xy = t["v_template"][:, :2]
    uv = 0.1 + 0.8 * (xy - xy.min(0).values) / (xy.max(0).values - xy.min(0).values)
    size_t = 64
    centres = (torch.arange(size_t) + 0.5) / size_t
    linear = torch.stack([centres[None, :].expand(size_t, -1), 1 - centres[:, None].expand(-1, size_t)])
    maps = torch.cat([linear, torch.zeros(1, size_t, size_t)])[None].expand(2, -1, -1, -1)  # R = u, G = v
    texture = FlameTexture(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3, 1), uv, t["faces"])
    fit = FaceFit(
        torch.tensor([0.2, -0.3]), torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.2]), torch.tensor([9.0, 10.0]),
        torch.tensor([[64.0, 60.0], [66.0, 64.0]]), torch.zeros(2, 6), torch.zeros(4),
    )  # fmt: skip
    frags = rasterize_fit(model, fit, 128).fragments
    albedo = texture.sample(frags, maps, model.winding_flipped)
    # the same UVs by hand: each covered pixel's triangle, its corners in the model's order
    tri, bary = frags.triangle, frags.bary
    mesh_faces = model.triangles
    for b, i, j in ((0, 64, 60), (1, 60, 70), (1, 70, 55)):
        assert frags.mask[b, i, j]
        corners = mesh_faces[tri[b, i, j]]
        expect = sum(float(bary[b, i, j, k]) * uv[corners[k]] for k in range(3))
        torch.testing.assert_close(albedo[b, i, j, :2], expect, atol=1e-5, rtol=0)
    assert float(albedo[~frags.mask].abs().max()) == 0.0

    fit.light = torch.stack([light_from_direction(torch.tensor([0.2, 0.3, 1.0]), 0.8, 0.3)] * 2).float()
    model.texture, fit.texture = texture, torch.zeros(2, 1)  # the model answers for a DECA fit's albedo
    buffers = render_buffers(model, fit, 128)
    geometry = rasterize_fit(model, fit, 128)
    flat = texture.sample(geometry.fragments, texture.maps(torch.zeros(2, 1)), model.winding_flipped)
    torch.testing.assert_close(buffers[:, 6:].permute(0, 2, 3, 1), flat)
    torch.testing.assert_close(buffers[:, 3:6], render_buffers(model, _with_albedo(fit), 128)[:, 3:6])
    shading = sh_shading(geometry.normals, fit.light)
    torch.testing.assert_close(buffers[:, :3].permute(0, 2, 3, 1), flat * shading * geometry.fragments.mask[..., None])


def _with_albedo(fit: FaceFit) -> FaceFit:
    fit.albedo = torch.full((len(fit), 3), 0.5)
    return fit
