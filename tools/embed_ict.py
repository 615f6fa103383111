"""Write the compact ICT FaceKit copy that ships inside the package (``rigcli/face/data``).

    python tools/embed_ict.py ICT_FOLDER_OR_ZIP [--out rigcli/face/data]

It reads the kept part exactly as ``rig assets import-ict`` does (``read_ict``) and stores it so
that it expands to the very same float32 tensors (``rigcli.face.ict.expand_embedded``): the landmark
fitter is chaotic, and 1e-7 cm of noise in a basis already moves a fitted pose by ~0.1 degree.
ICT's OBJ files hold short decimals (%g, mostly 6 significant digits), so each delta (shape -
neutral) is coded as the small integer difference of two decimals, and zlib packs those in byte
planes; the few deltas with no such code are kept as float32. The script checks the round trip bit
for bit. The same input always gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(REPO))

from rigcli.assets.ict import read_ict  # noqa: E402
from rigcli.face.ict import (  # noqa: E402
    _ICT_KEEP,
    _POW10,
    EMBEDDED_FORMAT,
    EMBEDDED_LICENCE,
    EMBEDDED_META,
    EMBEDDED_TENSORS,
    ICT_NAME,
    MAX_DIGITS,
    decode_deltas,
    embedded_model_id,
    expand_embedded,
)

SIGNIFICANT = (6, 7, 8, 9)  # ICT's OBJ files write coordinates with %g: 6 significant digits, a few with more
ZLIB_LEVEL = 9

DROPPED = (
    "ICT vertices outside "
    + " and ".join(f"{a}-{b}" for a, b in _ICT_KEEP)
    + " (mouth socket, eye sockets, gums and tongue, teeth, lacrimal fluid, eye blend, eye occlusion, "
    "eyelashes), as `rig assets import-ict` drops them; UVs, normals and materials; the shapes outside "
    "vertex_indices.json's 53 expressions (cheekRaiser_L/R, PupilDilate_L/R)"
)


def decimals(values: np.ndarray, significant: int) -> tuple[np.ndarray, np.ndarray]:
    """Each value's nearest decimal of ``significant`` digits, trailing zeros dropped, as (mantissa
    float64, digits int64) with value ≈ mantissa / 10**digits; digits may fall out of range."""
    x = values.astype(np.float64)
    nonzero = x != 0
    magnitude = np.floor(np.log10(np.abs(x), where=nonzero, out=np.zeros_like(x)))
    digits = np.where(nonzero, significant - 1 - magnitude, 0).astype(np.int64)
    mantissa = np.rint(x * np.power(10.0, digits))
    carried = np.abs(mantissa) >= 10**significant  # 9.999996 rounds up to 10.0000
    digits[carried] -= 1
    mantissa[carried] = np.rint(x[carried] * np.power(10.0, digits[carried]))
    for _ in range(MAX_DIGITS + significant):
        trim = (mantissa % 10 == 0) & (digits > 0) & nonzero
        if not trim.any():
            break
        mantissa[trim] /= 10
        digits[trim] -= 1
    return mantissa, digits


def neutral_decimals(neutral: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The neutral mesh's decimals (as ICT wrote them), checked to give back the imported float32."""
    mantissa, digits = decimals(neutral, SIGNIFICANT[0])
    ok = (digits >= 0) & (digits <= MAX_DIGITS) & (np.abs(mantissa) < 2**31)
    if not ok.all() or not np.array_equal(
        (mantissa / _POW10[np.clip(digits, 0, MAX_DIGITS)]).astype(np.float32).view(np.int32), neutral.view(np.int32)
    ):
        raise SystemExit("the neutral mesh is not 6-digit decimals: this copy of ICT-FaceKit is not the one expected")
    return mantissa.astype(np.int32), digits.astype(np.uint8)


def codes(
    deltas: np.ndarray, mantissa: np.ndarray, digits: np.ndarray, significant: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate codes (difference, extra digits) of float32 deltas whose shape value is written with
    ``significant`` digits, given their cells' neutral decimals; and which of them give the delta back."""
    base, neutral = digits.astype(np.int64), mantissa.astype(np.float64)
    shape_mantissa, shape_digits = decimals(neutral / _POW10[base] + deltas.astype(np.float64), significant)
    total = np.maximum(base, shape_digits)
    usable = (shape_digits >= 0) & (total <= MAX_DIGITS)
    total = np.where(usable, total, base)
    extra = total - base
    shape_scaled = shape_mantissa * _POW10[np.where(usable, total - shape_digits, 0)]
    neutral_scaled = neutral * _POW10[extra]
    difference = shape_scaled - neutral_scaled  # exact while both are integers below 2**53
    usable &= (np.abs(shape_scaled) < 2**53) & (np.abs(neutral_scaled) < 2**53) & (np.abs(difference) < 2**31 - 1)
    difference = np.where(usable, difference, 0).astype(np.int64)
    extra = np.where(usable, extra, 0)
    exact = decode_deltas(difference, extra, mantissa, digits).view(np.int32) == deltas.view(np.int32)
    return difference, extra, usable & exact


def encode_basis(deltas: np.ndarray, mantissa: np.ndarray, digits: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A basis (count, V, 3) float32 as zlib'd byte planes (see ``rigcli/face/ict.py``) and the flat
    indices whose value no code gives back exactly (the caller stores those as they are)."""
    flat, mantissa, digits = deltas.reshape(-1), mantissa.reshape(-1), digits.reshape(-1)
    difference = np.zeros(flat.size, np.int64)
    extra = np.zeros(flat.size, np.int64)
    pending = np.arange(flat.size)
    for significant in SIGNIFICANT:  # most shapes are written with 6 digits, a few with more
        cells = pending % mantissa.size
        got, more, ok = codes(flat[pending], mantissa[cells], digits[cells], significant)
        difference[pending[ok]], extra[pending[ok]] = got[ok], more[ok]
        pending = pending[~ok]
    zigzag = ((difference << 1) ^ (difference >> 63)).astype("<u4")
    planes = np.concatenate([zigzag.view(np.uint8).reshape(-1, 4).T, extra.astype(np.uint8)[None]])
    return zlib.compress(np.ascontiguousarray(planes).tobytes(), ZLIB_LEVEL), pending.astype(np.int32)


def runs(mask: np.ndarray) -> np.ndarray:
    """The True stretches of a boolean mask as (R, 2) half-open [start, stop) rows."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1).astype(np.int32)


def compact(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The imported model's dense tensors in the embedded form (see ``rigcli/face/ict.py``)."""
    neutral = tensors["neutral"].numpy()
    mantissa, digits = neutral_decimals(neutral)
    out = {
        "neutral": tensors["neutral"].to(torch.float32),
        "neutral.mantissa": torch.from_numpy(mantissa),
        "neutral.digits": torch.from_numpy(digits),
        "triangles": tensors["triangles"].to(torch.int32),
        "landmark_vertices": tensors["landmark_vertices"].to(torch.int32),
    }
    for key, dense in (("identity", "identity_basis"), ("expression", "expression_basis")):
        values = tensors[dense].numpy()
        code, wrong = encode_basis(values, mantissa, digits)
        out[f"{key}.count"] = torch.tensor([values.shape[0]], dtype=torch.int32)
        out[f"{key}.code"] = torch.frombuffer(bytearray(code), dtype=torch.uint8)
        out[f"{key}.exception_index"] = torch.from_numpy(wrong)
        out[f"{key}.exception_value"] = torch.from_numpy(values.reshape(-1)[wrong].copy())
    for key, mask in tensors.items():
        if key.startswith("region."):
            out[key] = torch.from_numpy(runs(mask.numpy()))
    return {k: v.contiguous() for k, v in out.items()}


def check_exact(dense: dict[str, torch.Tensor], expanded: dict[str, torch.Tensor]) -> None:
    """Every tensor must come back bit for bit: the fitter amplifies any difference."""
    if dense.keys() != expanded.keys():
        raise SystemExit(f"the round trip gives tensors {sorted(expanded)}, not {sorted(dense)}")
    for key, want in dense.items():
        got = expanded[key]
        same = got.dtype == want.dtype and got.shape == want.shape
        if same and want.is_floating_point():
            same = torch.equal(got.view(torch.int32), want.view(torch.int32))
        if not (same and torch.equal(got, want)):
            raise SystemExit(f"{key} does not survive the round trip")


def embed(source: Path, out: Path, progress=None) -> dict[str, int]:
    """Read ICT-FaceKit at ``source`` and write the three package files into ``out``; their sizes."""
    from safetensors.torch import load, save

    tensors, expression_names, licence = read_ict(source, progress)
    if not licence:
        raise SystemExit(f"no LICENSE found with {source}: ICT-FaceKit's MIT licence must travel with the data")
    packed = compact(tensors)
    blob = save(packed)
    check_exact(tensors, expand_embedded(load(blob)))
    dense_id = f"{ICT_NAME}-{hashlib.sha256(save({k: v.contiguous() for k, v in tensors.items()})).hexdigest()[:16]}"
    meta = {
        "name": ICT_NAME,
        "format": "rig compact ICT FaceKit",
        "format_version": EMBEDDED_FORMAT,
        "model_id": embedded_model_id(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "expression_names": expression_names,
        "vertices": int(tensors["neutral"].shape[0]),
        "triangles": int(tensors["triangles"].shape[0]),
        "identity_size": int(tensors["identity_basis"].shape[0]),
        "source": {
            "name": "ICT-FaceKit FaceXModel, USC ICT Vision and Graphics Lab",
            "url": "https://github.com/ICT-VGL/ICT-FaceKit",
            "licence": f"MIT, {EMBEDDED_LICENCE} beside this file",
            "imported_model_id": dense_id,  # what `rig assets import-ict` of the same copy caches
        },
        "dropped": DROPPED,
        "compression": {
            "lossless": "expands to tensors bit-identical to what `rig assets import-ict` caches (checked)",
            "neutral": "float32 as imported, plus its decimals as ICT wrote them (int32 mantissa, uint8 digits)",
            "bases": "each delta as the int32 difference of the shape's decimal from the neutral's, zigzag, "
            f"split into byte planes with the extra digits, zlib level {ZLIB_LEVEL}; deltas with no such code "
            "stored as float32 exceptions",
            "exceptions": {k: int(packed[f"{k}.exception_index"].numel()) for k in ("identity", "expression")},
            "triangles": "int32",
            "landmark_vertices": "int32",
            "regions": "int32 half-open [start, stop) runs of vertex indices",
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    files = {
        EMBEDDED_TENSORS: blob,
        EMBEDDED_META: (json.dumps(meta, indent=1) + "\n").encode(),
        EMBEDDED_LICENCE: licence,
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: len(data) for name, data in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="ICT-FaceKit folder (or FaceXModel/, or the repository's zip)")
    parser.add_argument("--out", type=Path, default=REPO / "rigcli" / "face" / "data", help="where to write")
    args = parser.parse_args(argv)
    sizes = embed(args.source, args.out)
    meta = json.loads((args.out / EMBEDDED_META).read_text())
    for name, size in sizes.items():
        print(f"{size / 1e6:9.3f} MB  {args.out / name}")
    print(f"{sum(sizes.values()) / 1e6:9.3f} MB  in all; model id {meta['model_id']}")
    print(f"lossless; float32 exceptions: {meta['compression']['exceptions']}")


if __name__ == "__main__":
    main()
