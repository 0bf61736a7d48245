"""Rigs kept on disk, keyed by the photo and its landmarks, so a photo is rigged once per
machine (written atomically: workers share the folder)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from avatar_stream.avatars import facerig as fr
from avatar_stream.engines.warp.rig import Field, WarpRig, build_rig, freeze

log = logging.getLogger(__name__)


# --- rig cache ----------------------------------------------------------------------------------

#: bump when the fields or the painting data change, so old cache entries are not used
WARP_RIG_VERSION = 2


def rig_cache_path(image: np.ndarray, landmarks: np.ndarray) -> Path:
    """<cache_dir>/warp/<key>.npz, keyed by the photo's pixels, its landmarks and the rig
    version: the same photo is prepared once, whatever file or upload it came from."""
    h = hashlib.sha256(f"warp-rig-v{WARP_RIG_VERSION}:{fr.image_key(image)}:".encode())
    h.update(np.ascontiguousarray(landmarks, dtype=np.float32).data)
    return fr.cache_dir() / "warp" / f"{h.hexdigest()}.npz"


def cached_rig(image: np.ndarray, landmarks: np.ndarray, *, use_cache: bool = True) -> WarpRig:
    """``build_rig`` through the disk cache (a torn or foreign file is rebuilt)."""
    path = rig_cache_path(image, landmarks) if use_cache else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                return _rig_from_arrays(image, dict(z))
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt
            log.warning("rebuilding unreadable warp rig cache %s: %s", path, exc)
    rig = build_rig(image, landmarks)
    if path is not None:
        _save_atomic(path, _rig_to_arrays(rig))
    return rig


def _rig_to_arrays(rig: WarpRig) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"roi": np.array(rig.roi), "track": rig.track,
                                  "grain": rig.grain.astype(np.float16)}
    for kind, fields in (("sharp", rig.sharp), ("smooth", rig.smooth)):
        for name, f in fields.items():
            out[f"{kind}.{name}.data"] = f.data
            out[f"{kind}.{name}.track"] = f.track
            out[f"{kind}.{name}.box"] = np.array(f.box)
    for name in _RIG_VALUES:
        out[name] = np.asarray(getattr(rig, name))
    return out


_RIG_VALUES = ("teeth_height", "cavity_rgb", "mucosa_rgb", "tongue_rgb", "teeth_rgb", "jaw_max")


def _rig_from_arrays(image: np.ndarray, z: dict[str, np.ndarray]) -> WarpRig:
    fields: dict[str, dict[str, Field]] = {"sharp": {}, "smooth": {}}
    for key in z:
        if key.endswith(".data"):
            kind, name, _ = key.split(".")
            box = tuple(int(v) for v in z[f"{kind}.{name}.box"])
            fields[kind][name] = Field(z[key], z[f"{kind}.{name}.track"], box)  # type: ignore[arg-type]
    x0, y0, x1, y1 = (int(v) for v in z["roi"])
    grid = np.stack(np.meshgrid(np.arange(x0, x1), np.arange(y0, y1)), -1).astype(np.float32)
    values = {name: z[name] for name in _RIG_VALUES}
    rig = WarpRig(
        image=image.copy(),
        roi=(x0, y0, x1, y1),
        grid=grid,
        sharp=fields["sharp"],
        smooth=fields["smooth"],
        track=z["track"].astype(np.float32),
        grain=z["grain"].astype(np.float32),
        teeth_height=float(values.pop("teeth_height")),
        jaw_max=float(values.pop("jaw_max")),
        **{k: v.astype(np.float32) for k, v in values.items()},
    )
    freeze(rig)
    return rig


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write via a temp file and rename: concurrent preparers never see half a file; a
    read-only cache only costs the rebuild next time."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write warp rig cache %s: %s", path, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
