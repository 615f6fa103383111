"""Importing the user's FLAME/DECA files: round trips, every refusal, safety of the unpicklers, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rigcli import RigError
from rigcli.assets.flame import (
    import_flame,
    read_deca,
    read_flame_model,
    read_landmarks,
    read_texture,
)
from rigcli.assets.unpickle import restricted_loads
from rigcli.face.flame import flame_folder, flame_model_id, flame_status, load_deca_encoder, load_flame_assets
from rigcli.store import Store
from tests.conftest import run_rig
from tests.flame_files import (
    e_flame_state,
    flame_arrays,
    landmark_content,
    write_deca,
    write_flame_pickle,
    write_landmarks,
    write_template,
    write_texture,
)


@dataclass
class Sources:
    folder: Path
    arrays: dict
    flame: Path
    landmarks_content: dict
    landmarks: Path
    texture_arrays: dict
    texture: Path
    template_arrays: dict
    template: Path
    e_flame: dict
    deca: Path


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> Sources:
    """One full-size set of stand-in files (FLAME 2020 sizes; a small texture)."""
    folder = tmp_path_factory.mktemp("flame-sources")
    arrays = flame_arrays(seed=1)
    content = landmark_content(seed=2)
    e_flame = e_flame_state(seed=3)
    return Sources(
        folder,
        arrays,
        write_flame_pickle(folder / "generic_model.pkl", arrays),
        content,
        write_landmarks(folder / "landmark_embedding.npy", content),
        write_texture(folder / "FLAME_texture.npz", seed=4),
        folder / "FLAME_texture.npz",
        write_template(folder / "head_template.obj", arrays["f"].astype(np.int64), seed=5),
        folder / "head_template.obj",
        e_flame,
        write_deca(folder / "deca_model.tar", e_flame),
    )


@pytest.fixture(scope="session")
def imported(sources, tmp_path_factory) -> Store:
    """A store with every stand-in file imported once."""
    store = Store(tmp_path_factory.mktemp("flame-home"))
    import_flame(
        store,
        flame=sources.flame,
        deca=sources.deca,
        texture=sources.texture,
        landmarks=sources.landmarks,
        template=sources.template,
    )
    return store


def copy_store(store: Store, tmp_path: Path) -> Store:
    shutil.copytree(store.root, tmp_path / "home")
    return Store(tmp_path / "home")


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- round trips


def test_flame_model_round_trip(imported, sources):
    t = load_flame_assets(imported)
    a = sources.arrays
    np.testing.assert_array_equal(t["v_template"].numpy(), a["v_template"].astype(np.float32))
    np.testing.assert_array_equal(t["shapedirs"].numpy(), a["shapedirs"][:, :, :300].astype(np.float32))
    np.testing.assert_array_equal(t["exprdirs"].numpy(), a["shapedirs"][:, :, 300:].astype(np.float32))
    np.testing.assert_array_equal(t["posedirs"].numpy(), a["posedirs"].astype(np.float32))
    np.testing.assert_array_equal(t["J_regressor"].numpy(), a["J_regressor"].astype(np.float32))
    np.testing.assert_array_equal(t["weights"].numpy(), a["weights"].astype(np.float32))
    np.testing.assert_array_equal(t["faces"].numpy(), a["f"].astype(np.int64))
    assert t["faces"].dtype == torch.int64 and t["kintree_table"].dtype == torch.int64
    assert t["kintree_table"].tolist() == [[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]


def test_landmarks_texture_template_round_trip(imported, sources):
    t = load_flame_assets(imported)
    c = sources.landmarks_content
    np.testing.assert_array_equal(t["static_lmk_faces_idx"].numpy(), c["static_lmk_faces_idx"])
    np.testing.assert_array_equal(t["static_lmk_bary_coords"].numpy(), c["static_lmk_bary_coords"].astype(np.float32))
    np.testing.assert_array_equal(t["dynamic_lmk_faces_idx"].numpy(), c["dynamic_lmk_faces_idx"].numpy())
    np.testing.assert_array_equal(t["dynamic_lmk_bary_coords"].numpy(), c["dynamic_lmk_bary_coords"].numpy())
    np.testing.assert_array_equal(t["full_lmk_faces_idx"].numpy(), c["full_lmk_faces_idx"][0])
    np.testing.assert_array_equal(t["full_lmk_bary_coords"].numpy(), c["full_lmk_bary_coords"][0])
    # texture: BGR file -> RGB, 0..255 -> 0..1, first 50 of 60 components
    mean, basis = sources.texture_arrays["mean"], sources.texture_arrays["tex_dir"]
    np.testing.assert_allclose(t["tex_mean"].numpy()[5, 7], mean[5, 7, [2, 1, 0]] / 255, rtol=1e-6)
    np.testing.assert_allclose(t["tex_basis"].numpy()[3, 2, :, 49], basis[3, 2, [2, 1, 0], 49] / 255, rtol=1e-6)
    assert t["tex_basis"].shape == (16, 16, 3, 50)
    np.testing.assert_array_equal(t["uv_coords"].numpy(), sources.template_arrays["uv_coords"])
    np.testing.assert_array_equal(t["uv_faces"].numpy(), sources.template_arrays["uv_faces"])


def test_deca_round_trip_and_manifest(imported, sources):
    state = load_deca_encoder(imported)
    assert state.keys() == sources.e_flame.keys()
    for key, value in sources.e_flame.items():
        assert torch.equal(state[key], value), key
    manifest = json.loads((flame_folder(imported) / "assets.json").read_text())
    assert manifest["flame_version"] == "2020"
    for role, path in [("flame", sources.flame), ("deca", sources.deca), ("landmarks", sources.landmarks)]:
        record = manifest["assets"][role]
        assert record["source"] == path.name
        assert record["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        cache = flame_folder(imported) / record["cache"]
        assert record["cache_sha256"] == hashlib.sha256(cache.read_bytes()).hexdigest()
    assert manifest["assets"]["texture"]["kind"] == "FLAME"
    assert sum(manifest["assets"]["deca"]["code_split"].values()) == 236


def test_chumpy_expressions_are_evaluated_without_chumpy(tmp_path, sources):
    path = write_flame_pickle(tmp_path / "generic_model.pkl", sources.arrays, select_shapedirs=True)
    assert b"chumpy.reordering\nSelect" in path.read_bytes()
    model = read_flame_model(path)
    np.testing.assert_array_equal(model["shapedirs"], sources.arrays["shapedirs"][:, :, :300].astype(np.float32))
    np.testing.assert_array_equal(model["exprdirs"], sources.arrays["shapedirs"][:, :, 300:].astype(np.float32))


def test_bfm_albedo(tmp_path):
    arrays = write_texture(tmp_path / "FLAME_albedo_from_BFM.npz", kind="BFM", side=8, components=55)
    tensors, kind = read_texture(tmp_path / "FLAME_albedo_from_BFM.npz")
    assert kind == "BFM"
    image = arrays["MU"].reshape(8, 8, 3)
    np.testing.assert_allclose(tensors["tex_mean"][2, 6], image[2, 6, ::-1], rtol=1e-6)
    np.testing.assert_allclose(tensors["tex_basis"][1, 1, 0, 10], arrays["PC"].reshape(8, 8, 3, 55)[1, 1, 2, 10])


# ---------------------------------------------------------------- refusals, one line each


def _flame_error(tmp_path: Path, arrays: dict, name: str = "generic_model.pkl", drop=()) -> str:
    path = write_flame_pickle(tmp_path / name, arrays, drop=drop)
    with pytest.raises(RigError) as info:
        read_flame_model(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    return message


def test_flame_missing_key(tmp_path, sources):
    message = _flame_error(tmp_path, sources.arrays, drop=("posedirs",))
    assert "has no 'posedirs'" in message and "shapedirs" in message  # names what it found too


def test_flame_wrong_shape(tmp_path, sources):
    arrays = {**sources.arrays, "weights": sources.arrays["weights"][:, :4]}
    assert "'weights' has shape (5023, 4), expected (5023, 5)" in _flame_error(tmp_path, arrays)


def test_flame_other_sizes_say_which(tmp_path):
    message = _flame_error(tmp_path, flame_arrays(vertices=5143, faces=10144, components=400))
    assert "not FLAME 2020: found 5143 vertices and 10144 triangles, expected 5023 and 9976" in message
    message = _flame_error(tmp_path, flame_arrays(components=350))
    assert "'shapedirs' has 350 components, expected 400" in message


def test_flame_2023_file_is_named(tmp_path, sources):
    message = _flame_error(tmp_path, sources.arrays, name="flame2023.pkl")
    assert "looks like FLAME 2023" in message and "FLAME 2020" in message


def test_flame_corrupted_and_not_a_pickle(tmp_path, sources):
    data = sources.flame.read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(RigError, match=r"cut\.pkl is (truncated or damaged|not a readable pickle)"):
        read_flame_model(tmp_path / "cut.pkl")
    (tmp_path / "notes.pkl").write_text("this is a text file\n")
    with pytest.raises(RigError, match=r"notes\.pkl is not a readable pickle"):
        read_flame_model(tmp_path / "notes.pkl")
    with pytest.raises(RigError, match=r"deca_model\.tar is a zip archive"):
        write_deca(tmp_path / "deca_model.tar", {"x": torch.zeros(1)}, legacy=False)
        read_flame_model(tmp_path / "deca_model.tar")
    with pytest.raises(RigError, match="not found"):
        read_flame_model(tmp_path / "missing.pkl")


class _Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_calls_os_system_is_refused(tmp_path, sources):
    marker = tmp_path / "pwned"
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": _Exploit(marker), "f": np.zeros(3)}, protocol=2))
    with pytest.raises(RigError, match=r"refuses to load (posix|nt|os)\.system") as info:
        read_flame_model(path)
    assert "not a genuine FLAME model" in str(info.value)
    assert not marker.exists()
    # the same inside the landmark .npy, which numpy would happily unpickle
    npy = write_landmarks(tmp_path / "landmark_embedding.npy", {**sources.landmarks_content, "x": _Exploit(marker)})
    with pytest.raises(RigError, match="refuses to load"):
        read_landmarks(npy)
    assert not marker.exists()
    # and through the CLI: one line, exit 2, nothing imported
    result = run_rig("assets", "import-flame", "--flame", str(path), home=tmp_path / "home")
    assert result.returncode == 2 and "refuses to load" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "home" / "assets" / "flame").exists()


def test_restricted_unpickler_allows_only_its_list():
    for data in (
        b"cbuiltins\neval\n(S'1+1'\ntR.",  # a builtin that runs code
        b"cnumpy\nload\n(S'x.npy'\ntR.",  # a numpy function that is not array reconstruction
        b"ccopy_reg\n_reconstructor\n(ccollections\nOrderedDict\nc__builtin__\nobject\nNtR.",  # not a stand-in
        b"ctorch._utils\n_rebuild_tensor_v2\n(I1\nI0\n(I1\nt(I1\ntI00\nccollections\nOrderedDict\n)RtR.",
    ):
        with pytest.raises(pickle.UnpicklingError, match="refuses"):
            restricted_loads(data)
    # what FLAME and DECA files need still loads
    assert np.array_equal(restricted_loads(pickle.dumps(np.arange(4.0), protocol=2)), np.arange(4.0))
    assert torch.equal(
        restricted_loads(pickle.dumps(torch.arange(6).view(2, 3), protocol=2)), torch.arange(6).view(2, 3)
    )


def test_landmark_errors(tmp_path, sources):
    content = dict(sources.landmarks_content)
    del content["full_lmk_faces_idx"]
    with pytest.raises(RigError, match=r"landmark_embedding\.npy has no 'full_lmk_faces_idx'"):
        read_landmarks(write_landmarks(tmp_path / "landmark_embedding.npy", content))
    content = {**sources.landmarks_content, "static_lmk_faces_idx": np.full(51, 9976)}
    with pytest.raises(RigError, match=r"'static_lmk_faces_idx' must hold triangle indices in 0\.\.9975"):
        read_landmarks(write_landmarks(tmp_path / "landmark_embedding.npy", content))
    content = {**sources.landmarks_content, "full_lmk_bary_coords": np.zeros((60, 3))}
    with pytest.raises(RigError, match=r"'full_lmk_bary_coords' has shape \(60, 3\), expected \(68, 3\)"):
        read_landmarks(write_landmarks(tmp_path / "landmark_embedding.npy", content))


def test_texture_errors(tmp_path):
    np.savez(tmp_path / "tex.npz", albedo=np.zeros(3))
    with pytest.raises(RigError, match=r"neither 'mean' and 'tex_dir'.*keys found: albedo"):
        read_texture(tmp_path / "tex.npz")
    np.savez(tmp_path / "tex.npz", mean=np.zeros((10, 12, 3)), tex_dir=np.zeros((10, 12, 3, 60)))
    with pytest.raises(RigError, match="not a square RGB image"):
        read_texture(tmp_path / "tex.npz")
    write_texture(tmp_path / "tex.npz", side=8, components=20)
    with pytest.raises(RigError, match="has 20 components; rig uses the first 50"):
        read_texture(tmp_path / "tex.npz")


def test_deca_refuses_objects_that_are_not_tensors(tmp_path, sources):
    marker = tmp_path / "pwned"
    path = write_deca(tmp_path / "deca_model.tar", {"x": torch.zeros(1)}, extra={"opt": _Exploit(marker)})
    with pytest.raises(RigError, match=r"holds objects other than tensors.*weights_only=True"):
        read_deca(path)
    assert not marker.exists()


def test_deca_structure_errors(tmp_path, sources):
    state = dict(sources.e_flame)
    state["layers.2.weight"] = torch.zeros(200, 1024)
    with pytest.raises(RigError, match=r"'E_flame' layers\.2\.weight has shape \(200, 1024\), expected \(236, 1024\)"):
        read_deca(write_deca(tmp_path / "deca_model.tar", state))
    state = {k: v for k, v in sources.e_flame.items() if k != "encoder.layer3.5.conv2.weight"}
    with pytest.raises(RigError, match=r"1 missing \(first: encoder\.layer3\.5\.conv2\.weight\)"):
        read_deca(write_deca(tmp_path / "deca_model.tar", state))
    torch.save({"E_detail": {}}, tmp_path / "other.tar")
    with pytest.raises(RigError, match=r"other\.tar has no 'E_flame' \(found: E_detail\)"):
        read_deca(tmp_path / "other.tar")
    (tmp_path / "junk.tar").write_bytes(b"\x00" * 100)
    with pytest.raises(RigError, match=r"junk\.tar is not a readable torch file"):
        read_deca(tmp_path / "junk.tar")


# ---------------------------------------------------------------- the store


def test_failed_import_keeps_the_previous_one(imported, sources, tmp_path):
    store = copy_store(imported, tmp_path)
    before = folder_digest(flame_folder(store))
    bad = dict(sources.e_flame)
    bad["layers.0.weight"] = torch.zeros(1024, 512)
    with pytest.raises(RigError, match=r"layers\.0\.weight"):
        import_flame(store, flame=sources.flame, deca=write_deca(tmp_path / "bad.tar", bad))
    assert folder_digest(flame_folder(store)) == before
    assert [p.name for p in (store.root / "assets").iterdir()] == ["flame"]  # no staging folder left
    assert load_deca_encoder(store)["layers.0.weight"].shape == (1024, 2048)


def test_partial_import_replaces_only_what_is_given(imported, tmp_path):
    store = copy_store(imported, tmp_path)
    before, model_id = folder_digest(flame_folder(store)), flame_model_id(store)
    write_texture(tmp_path / "FLAME_albedo_from_BFM.npz", kind="BFM", side=8, components=50)
    import_flame(store, texture=tmp_path / "FLAME_albedo_from_BFM.npz")
    after = folder_digest(flame_folder(store))
    assert after["texture.safetensors"] != before["texture.safetensors"]
    assert {k: v for k, v in after.items() if k not in ("texture.safetensors", "assets.json")} == {
        k: v for k, v in before.items() if k not in ("texture.safetensors", "assets.json")
    }
    assert load_flame_assets(store)["tex_mean"].shape == (8, 8, 3)
    assert flame_model_id(store) == model_id  # the geometry did not change


def test_an_import_killed_mid_swap_is_undone(imported, tmp_path):
    store = copy_store(imported, tmp_path)
    folder = flame_folder(store)
    os.replace(folder, folder.parent / ".trash-flame-1234abcd")  # killed after moving the old folder aside
    assert load_flame_assets(store)["faces"].shape == (9976, 3)
    assert folder.is_dir() and not list(folder.parent.glob(".trash-*"))


def test_missing_assets_say_how_to_import(tmp_path, sources):
    store = Store(tmp_path / "home")
    (store.root / "assets" / "ict").mkdir(parents=True)  # another face model, but no FLAME
    with pytest.raises(RigError, match=r"rig assets import-flame --flame generic_model\.pkl"):
        load_flame_assets(store)
    with pytest.raises(RigError, match=r"no FLAME model imported yet"):
        import_flame(store, landmarks=sources.landmarks)
    assert not all(item.present for item in flame_status(store))


def test_template_must_match_flame_triangles(imported, sources, tmp_path):
    store = copy_store(imported, tmp_path)
    before = folder_digest(flame_folder(store))
    other = write_template(tmp_path / "head_template.obj", sources.arrays["f"][::-1].astype(np.int64))
    with pytest.raises(RigError, match=r"head_template\.obj: its triangles are not those of the FLAME model"):
        import_flame(store, template=tmp_path / "head_template.obj")
    assert other and folder_digest(flame_folder(store)) == before


def test_damaged_cache_is_detected(imported, tmp_path):
    store = copy_store(imported, tmp_path)
    cache = flame_folder(store) / "landmarks.safetensors"
    data = bytearray(cache.read_bytes())
    data[-1] ^= 0xFF
    cache.write_bytes(bytes(data))
    with pytest.raises(RigError, match=r"landmarks\.safetensors is damaged"):
        load_flame_assets(store)


def test_status_lists_present_and_missing(imported, sources, tmp_path):
    store = copy_store(imported, tmp_path)
    (flame_folder(store) / "deca.safetensors").unlink()
    manifest = json.loads((flame_folder(store) / "assets.json").read_text())
    del manifest["assets"]["deca"]
    (flame_folder(store) / "assets.json").write_text(json.dumps(manifest))
    result = run_rig("assets", "status", home=store.root)
    assert result.returncode == 0, result.stderr
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert "ok" in lines["FLAME: generic_model.pkl"] and "--face-model flame" in lines["FLAME: generic_model.pkl"]
    assert "missing" in lines["DECA: deca_model.tar"] and "import-flame --deca" in lines["DECA: deca_model.tar"]


def test_import_flame_help_names_every_file():
    from typer.testing import CliRunner

    from rigcli.cli import app

    result = CliRunner().invoke(app, ["assets", "import-flame", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("--flame", "generic_model.pkl", "--deca", "deca_model.tar", "--texture", "FLAME_albedo_from_BFM.npz"):
        assert text in result.stdout
    for text in ("--landmarks", "landmark_embedding.npy", "--template", "head_template.obj"):
        assert text in result.stdout
