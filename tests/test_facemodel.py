"""Importing ICT FaceKit: folder or zip, .obj or .obj.gz, the cached model and its checks."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from rigcli import RigError
from rigcli.assets.ict import download_ict, import_ict, parse_obj_vertices
from rigcli.face.ict import ICT_NAME, installed, model_folder
from rigcli.face.registry import load_face_model
from rigcli.store import Store
from tests.conftest import ICT


def test_cached_model_shapes_and_regions(imported_face_model, ict_store):
    m = imported_face_model
    assert m.neutral.shape == (14388, 3) and m.identity_basis.shape == (100, 14388, 3)
    assert m.expression_basis.shape == (53, 14388, 3) and len(m.expression_names) == 53
    assert {"jawOpen", "mouthSmile_L", "eyeBlink_R"} <= set(m.expression_names)
    assert m.triangles.max() < 14388 and m.triangles.min() >= 0
    assert m.landmark_vertices.shape == (68,)
    lm = m.neutral[m.landmark_vertices]
    assert lm[0, 0] < 0 < lm[16, 0] and lm[8, 1] < lm[30, 1] < lm[27, 1]  # jaw ends, chin < nose < brows
    assert m.regions["face"].sum() == 9409 and m.regions["eyeball_left"].sum() == 1570
    assert (model_folder(ict_store) / "LICENSE").read_text().startswith("MIT License")


def test_basis_reproduces_the_source_meshes(imported_face_model):
    # vertices(identity = e_7) must equal identity007.obj, restricted to the kept vertices
    raw = parse_obj_vertices(gzip.decompress((ICT / "FaceXModel" / "identity007.obj.gz").read_bytes()))
    neutral = parse_obj_vertices(gzip.decompress((ICT / "FaceXModel" / "generic_neutral_mesh.obj.gz").read_bytes()))
    keep = np.r_[0:11248, 21451:24591]
    ident = torch.zeros(1, 100)
    ident[0, 7] = 1.0
    got = imported_face_model.vertices(ident, torch.zeros(1, 53))[0].numpy()
    np.testing.assert_allclose(got, raw[keep], atol=1e-4)
    smile = parse_obj_vertices(gzip.decompress((ICT / "FaceXModel" / "mouthSmile_L.obj.gz").read_bytes()))
    expr = torch.zeros(1, 53)
    expr[0, imported_face_model.expression_names.index("mouthSmile_L")] = 0.5
    got = imported_face_model.vertices(torch.zeros(1, 100), expr)[0].numpy()
    np.testing.assert_allclose(got, (neutral + 0.5 * (smile - neutral))[keep], atol=1e-4)
    index = imported_face_model.landmark_vertices
    assert torch.allclose(
        imported_face_model.vertices(ident, expr, index), imported_face_model.vertices(ident, expr)[:, index]
    )


def test_zip_of_the_repository_gives_the_same_model(tmp_path, imported_face_model, ict_zip):
    store = Store(tmp_path / "home")
    import_ict(ict_zip, store)
    model = load_face_model(store)
    assert model.model_id == imported_face_model.model_id
    assert (model_folder(store) / "LICENSE").is_file()


def test_download_from_a_local_server(tmp_path, imported_face_model, ict_zip):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ict_zip.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = Store(tmp_path / "home")
        seen = []
        url = f"http://127.0.0.1:{server.server_port}/{ict_zip.name}"
        download_ict(store, url, progress=lambda done, total: seen.append((done, total)))
        assert load_face_model(store).model_id == imported_face_model.model_id
        assert seen[-1] == (ict_zip.stat().st_size, ict_zip.stat().st_size)
        assert not list(store.root.glob(".tmp-*"))  # the zip is not kept
        with pytest.raises(RigError, match="could not download"):
            download_ict(Store(tmp_path / "other"), f"http://127.0.0.1:{server.server_port}/missing.zip")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RigError, match="could not download"):
        download_ict(Store(tmp_path / "third"), url, timeout=5)  # nobody listens any more


def test_import_errors_are_clear(tmp_path):
    store = Store(tmp_path / "home")
    with pytest.raises(RigError, match="does not exist"):
        import_ict(tmp_path / "nope", store)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RigError, match=r"vertex_indices\.json"):
        import_ict(tmp_path / "empty", store)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(RigError, match="neither a folder nor a zip"):
        import_ict(tmp_path / "junk.zip", store)
    partial = tmp_path / "partial" / "FaceXModel"
    partial.mkdir(parents=True)
    (partial / "vertex_indices.json").write_bytes((ICT / "FaceXModel" / "vertex_indices.json").read_bytes())
    (partial / "generic_neutral_mesh.obj.gz").write_bytes(
        (ICT / "FaceXModel" / "generic_neutral_mesh.obj.gz").read_bytes()
    )
    with pytest.raises(RigError, match=r"identity000\.obj .* missing"):
        import_ict(tmp_path / "partial", store)
    assert not installed(store, ICT_NAME)  # a failed import leaves no model behind


def test_missing_or_damaged_model_says_how_to_get_one(tmp_path, ict_store, without_embedded_face_model):
    with pytest.raises(RigError, match="rig assets download-ict"):
        load_face_model(Store(tmp_path))
    damaged = Store(tmp_path / "copy")
    folder = model_folder(damaged)
    folder.mkdir(parents=True)
    source = model_folder(ict_store)
    (folder / "model.json").write_text((source / "model.json").read_text())
    blob = bytearray((source / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(RigError, match="damaged"):
        load_face_model(damaged)
    assert json.loads((folder / "model.json").read_text())["name"] == "ict"
