"""The embedded CPU engine: animate one photo with displacement-field blendshapes.

Why this design: it needs no model weights and no GPU, so the whole product runs (and is
tested) anywhere, at a few milliseconds per frame.

``prepare`` turns the face rig (468 MediaPipe landmarks) into dense displacement fields, one
per control (jaw, lip spread / round, brow, head yaw / pitch / roll, breathing). Each field
has compact support with a smooth falloff, so hair and background stay still and nothing
tears. Per frame the stream turns 40 ms of speech into control values, sums the weighted
fields into one backward map and draws the frame with a single ``cv2.remap`` over the region
the fields touch. Two things a warp cannot do are painted on afterwards: the inside of an open
mouth (a warp can only stretch the lips, never reveal what is behind them) and closed eyelids
(warping lid skin down would drag glasses rims and brows along).

Conventions: a field ``D`` is a *backward* displacement in output pixel coordinates: output
pixel ``q`` is sampled from the photo at ``q - sum(w_i * D_i(q))``. Building fields in output
coordinates lets the jaw use a hard split along the lip line (the lips part, the gap is painted
over) without folding the picture anywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from avatar_stream import facerig as fr

from .base import (
    FPS,
    FRAME_SIZE,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    Avatar,
    AvatarError,
    Box,
    Engine,
    EngineStream,
)

_NOSE_BOTTOM = 2  # face-mesh point under the nose (subnasale)
_DEG = math.pi / 180.0
_LOWRES = 4  # head fields are smooth: stored at 1/4 resolution, upsampled per frame

# Points whose displaced positions the painting needs, in this order: inner lips, then per eye
# the upper and lower lid (each contour runs corner to corner).
_CONTOURS = (
    fr.LIPS_UPPER_INNER,
    fr.LIPS_LOWER_INNER,
    fr.LEFT_EYE_UPPER,
    fr.LEFT_EYE_LOWER,
    fr.RIGHT_EYE_UPPER,
    fr.RIGHT_EYE_LOWER,
)
_TRACK_IDS = [i for contour in _CONTOURS for i in contour]
_bounds = np.cumsum([0] + [len(c) for c in _CONTOURS])
_SLICES = [slice(int(a), int(b)) for a, b in zip(_bounds[:-1], _bounds[1:], strict=True)]
_LIP_UP, _LIP_LO = _SLICES[0], _SLICES[1]
_LIDS = ((_SLICES[2], _SLICES[3]), (_SLICES[4], _SLICES[5]))
_BROWS = (
    (fr.LEFT_EYEBROW + fr.LEFT_EYEBROW_LOWER, fr.LEFT_EYE_UPPER),
    (fr.RIGHT_EYEBROW + fr.RIGHT_EYEBROW_LOWER, fr.RIGHT_EYE_UPPER),
)


@dataclass
class Controls:
    """One frame's animation controls; all zero draws the photo itself."""

    jaw: float = 0.0  # 0 closed .. 1 widest speech opening
    spread: float = 0.0  # 0 .. 1 lips spread (as in "ee")
    round: float = 0.0  # 0 .. 1 lips rounded (as in "oo")
    blink: float = 0.0  # 0 open .. 1 closed
    brow: float = 0.0  # 0 .. 1 raised
    yaw: float = 0.0  # degrees
    pitch: float = 0.0  # degrees, positive nods down
    roll: float = 0.0  # degrees
    breath: float = 0.0  # pixels, positive moves the head down


@dataclass(frozen=True)
class _Field:
    """One blendshape: backward displacement per unit weight, and how it moves the tracked
    contour points (forward) so the painting follows the warp."""

    data: np.ndarray  # (h, w, 2) float32 (dx, dy): the box (sharp) or the whole ROI, 1/4 res
    track: np.ndarray  # (n_track, 2) float32
    box: Box  # x0, y0, x1, y1 inside the ROI: outside it the field is exactly zero


@dataclass(frozen=True)
class WarpRig:
    """Everything ``render`` needs: made once per avatar, read-only afterwards, so any number
    of sessions on any threads can share it."""

    image: np.ndarray  # (512, 512, 3) uint8 RGB
    roi: Box  # x0, y0, x1, y1: no pixel outside it ever changes
    grid: np.ndarray  # (h, w, 2) float32 identity map of the ROI
    sharp: dict[str, _Field]  # full resolution, own windows (jaw, lips, brow)
    smooth: dict[str, _Field]  # 1/_LOWRES resolution, whole ROI (head pose, breath)
    track: np.ndarray  # (n_track, 2) float32 contour points in the photo
    teeth_height: float  # most upper teeth shown, px
    cavity_rgb: np.ndarray  # (3,) float32 colours of the painted parts
    tongue_rgb: np.ndarray
    teeth_rgb: np.ndarray
    jaw_max: float  # px the lower lip drops at jaw = 1


# --- shaping helpers ---------------------------------------------------------------------------


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, zero slope at both ends: the falloff that never shows a seam."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _falloff(dist: np.ndarray, inner: Any, outer: Any) -> np.ndarray:
    """1 inside ``inner``, 0 beyond ``outer``, smooth in between (compact support)."""
    return 1.0 - _smoothstep((dist - inner) / np.maximum(outer - inner, 1e-6))


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Coverage of a pixel at signed distance ``d`` inside an edge: antialiasing/feathering."""
    return np.clip(d / width + 0.5, 0.0, 1.0)


def _remap(src: np.ndarray, mapxy: np.ndarray, border: int) -> np.ndarray:
    """Bilinear lookup of ``src`` at the absolute (x, y) coordinates in ``mapxy``."""
    out = cv2.remap(  # type: ignore[call-overload]
        src, mapxy, None, cv2.INTER_LINEAR, borderMode=border
    )
    return np.asarray(out)


def _interp_contour(u: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """A contour's second coordinate at each first coordinate; flat beyond its ends."""
    order = np.argsort(pts[:, 0], kind="stable")
    return np.interp(u, pts[order, 0], pts[order, 1])


class _Frame:
    """Face-aligned coordinates: u along the eye line, v down the face, origin at the mouth.
    Fields are built in these, so a tilted face animates like an upright one."""

    def __init__(self, origin: np.ndarray, angle: float) -> None:
        self.origin = origin.astype(np.float64)
        self.eu = np.array([math.cos(angle), math.sin(angle)])
        self.ev = np.array([-math.sin(angle), math.cos(angle)])

    def uv(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = x - self.origin[0], y - self.origin[1]
        return dx * self.eu[0] + dy * self.eu[1], dx * self.ev[0] + dy * self.ev[1]

    def pts(self, p: np.ndarray) -> np.ndarray:
        return np.stack(self.uv(p[:, 0], p[:, 1]), axis=1)

    def to_xy(self, du: Any, dv: Any) -> np.ndarray:
        """A displacement along (u, v) as an (..., 2) image-axes array."""
        du, dv = np.broadcast_arrays(du, dv)
        dx = du * self.eu[0] + dv * self.ev[0]
        dy = du * self.eu[1] + dv * self.ev[1]
        return np.stack([dx, dy], axis=-1).astype(np.float32)


@dataclass(frozen=True)
class _Geometry:
    """The rig reduced to what the fields are built from (face-aligned coordinates)."""

    frame: _Frame
    lm: np.ndarray  # (468, 2) image px
    uv: np.ndarray  # (468, 2) aligned
    depth: np.ndarray  # (468,) px towards the camera, ~0 on the face outline
    face_w: float
    face_h: float
    mouth_hw: float  # half the corner-to-corner width
    jaw_max: float
    oval_c: np.ndarray  # ellipse around the face outline: centre (u, v), semi-axes
    oval_ab: np.ndarray

    def ids(self, ids: Any) -> np.ndarray:
        return self.uv[list(ids)]


def _geometry(landmarks: np.ndarray) -> _Geometry:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (fr.NUM_LANDMARKS, 3) or not np.isfinite(lm).all():
        raise AvatarError(f"expected {fr.NUM_LANDMARKS} face landmarks, got {lm.shape}")
    eye_a = lm[list(fr.LEFT_EYE_CORNERS), :2].mean(axis=0)
    eye_b = lm[list(fr.RIGHT_EYE_CORNERS), :2].mean(axis=0)
    angle = math.atan2(eye_b[1] - eye_a[1], eye_b[0] - eye_a[0])
    frame = _Frame(lm[list(fr.MOUTH_CORNERS), :2].mean(axis=0), angle)
    uv = frame.pts(lm[:, :2])
    oval = uv[fr.FACE_OVAL]
    face_w = float(np.ptp(oval[:, 0]))
    face_h = float(uv[fr.CHIN, 1] - uv[fr.FOREHEAD_TOP, 1])
    mouth_hw = 0.5 * float(uv[fr.MOUTH_CORNERS[1], 0] - uv[fr.MOUTH_CORNERS[0], 0])
    if face_w < 40 or face_h < 40 or mouth_hw < 4:
        raise AvatarError("the face is too small to animate")
    z = lm[:, 2]
    lo, hi = oval.min(axis=0), oval.max(axis=0)
    return _Geometry(
        frame=frame,
        lm=lm[:, :2],
        uv=uv,
        depth=np.maximum(0.0, z[fr.FACE_OVAL].mean() - z),
        face_w=face_w,
        face_h=face_h,
        mouth_hw=mouth_hw,
        jaw_max=0.11 * face_h,
        oval_c=(lo + hi) / 2.0,
        oval_ab=(hi - lo) / 2.0,
    )


# --- the fields: each maps pixel coordinates (x, y) to (..., 2) backward displacements --------


def _lens(g: _Geometry, u: np.ndarray) -> np.ndarray:
    """How far the lips part across the mouth: 1 in the middle, 0 at the inner corners."""
    left, right = g.uv[fr.LIPS_UPPER_INNER[0], 0], g.uv[fr.LIPS_UPPER_INNER[-1], 0]
    r = np.abs(u - 0.5 * (left + right)) / max(0.45 * abs(right - left), 1.0)
    return np.clip(1.0 - r * r, 0.0, 1.0) ** 1.3


def _jaw_field(g: _Geometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Jaw open (1 = widest): everything below the lip line drops, the chin a bit more, the
    neck stretches; the upper lip lifts a little. The split along the lip line is hard between
    the corners and smooth outside them, and every slope stays under 1 so the map never folds."""
    u, v = g.frame.uv(x, y)
    corners = g.ids(fr.MOUTH_CORNERS)
    split = _interp_contour(u, np.vstack([g.ids(fr.LIPS_LOWER_INNER), corners]))
    split_up = _interp_contour(u, np.vstack([g.ids(fr.LIPS_UPPER_INNER), corners]))
    t = v - split  # depth below the lip line
    lens = _lens(g, u)
    # below the lips the drop starts at ``lens`` (the lips part) and reaches 1 further down;
    # outside the corners it starts at 0 (the cheeks stretch)
    below = lens + (1.0 - lens) * _smoothstep(t / (1.7 * g.jaw_max))
    chin_v = g.uv[fr.CHIN, 1]
    du = u
    # the moving jaw follows the face outline, which narrows towards the chin
    oval = g.ids(fr.FACE_OVAL)
    lower = oval[oval[:, 1] > 0]
    order = np.argsort(lower[:, 1])
    half = np.interp(v, lower[order, 1], np.abs(lower[order, 0]))
    outer = 1.1 * np.maximum(half, 0.28 * g.face_w)
    inner = np.minimum(0.9 * g.mouth_hw + 0.15 * np.clip(t, 0, None), 0.8 * outer)
    lateral = _falloff(np.abs(du), inner, outer)
    gain = 1.0 + 0.2 * np.clip(t / max(chin_v, 1.0), 0.0, 1.0)
    neck = _falloff(v - chin_v, 0.0, 0.36 * g.face_h)
    dv_lower = np.where(t >= 0.0, below * lateral * gain * neck, 0.0)
    nose_gap = max(float(-g.uv[_NOSE_BOTTOM, 1]), 4.0)
    lift = _falloff(np.clip(split_up - v, 0.0, None), 0.0, 1.2 * nose_gap)
    dv_upper = np.where(t < 0.0, -0.1 * lens * lift, 0.0)
    # the mouth narrows a little as it opens
    band = _falloff(np.abs(v - 0.3 * g.jaw_max), 0.8 * g.jaw_max, 2.5 * g.jaw_max)
    narrow = -0.06 * du / g.mouth_hw * _falloff(np.abs(du), g.mouth_hw, 2.2 * g.mouth_hw)
    return g.frame.to_xy(narrow * band * g.jaw_max, (dv_lower + dv_upper) * g.jaw_max)


def _lips_field(g: _Geometry, x: np.ndarray, y: np.ndarray, amount: float) -> np.ndarray:
    """Mouth corners outward (amount > 0: spread, "ee") or inward (< 0: rounded, "oo"), as a
    fraction of the half mouth width."""
    u, v = g.frame.uv(x, y)
    hw = g.mouth_hw
    top = float(g.uv[fr.OUTER_LIP_TOP, 1])
    bottom = float(g.uv[fr.OUTER_LIP_BOTTOM, 1]) + 0.5 * g.jaw_max
    dist_v = np.maximum(top - v, 0.0) + np.maximum(v - bottom, 0.0)
    env = _falloff(dist_v, 0.0, 1.3 * hw)
    shape = u / hw * _falloff(np.abs(u), 0.9 * hw, 2.4 * hw)
    move_u = amount * hw * shape * env
    # spreading lifts the corners a touch (a hint of a smile)
    move_v = -0.25 * max(amount, 0.0) * hw * np.abs(shape) * env
    return g.frame.to_xy(move_u, move_v)


def _brow_field(g: _Geometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brow raise: brows lift, the forehead above bunches, the eyes stay put."""
    u, v = g.frame.uv(x, y)
    total = np.zeros(np.shape(u), np.float64)
    for brow_ids, lid_ids in _BROWS:
        brow = g.ids(brow_ids)
        width = float(np.ptp(brow[:, 0]))
        lat = _falloff(np.abs(u - brow[:, 0].mean()), 0.45 * width, 0.85 * width)
        brow_v = _interp_contour(u, brow)
        lid_v = _interp_contour(u, g.ids(lid_ids))
        down = _falloff(v - brow_v, 0.0, np.maximum(lid_v - brow_v, 2.0))
        up = _falloff(brow_v - v, 0.0, 0.35 * g.face_h)
        total += np.where(v >= brow_v, down, up) * lat
    return g.frame.to_xy(0.0, -0.02 * g.face_h * total)


def _oval_r(g: _Geometry, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.hypot((u - g.oval_c[0]) / g.oval_ab[0], (v - g.oval_c[1]) / g.oval_ab[1])


def _depth_map(g: _Geometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Landmark depth spread into a smooth surface (normalised Gaussian splatting on a coarse
    private grid), sampled at (x, y); zero outside the face outline."""
    sigma = 0.07 * g.face_w
    step = max(sigma / 3.0, 1.0)
    x0, y0 = g.lm.min(axis=0) - 4 * sigma
    nx, ny = (np.ptp(g.lm, axis=0) + 8 * sigma) / step + 2
    num = np.zeros((int(ny), int(nx)), np.float32)
    den = np.zeros_like(num)
    ix = np.clip(np.round((g.lm[:, 0] - x0) / step).astype(int), 0, num.shape[1] - 1)
    iy = np.clip(np.round((g.lm[:, 1] - y0) / step).astype(int), 0, num.shape[0] - 1)
    np.add.at(num, (iy, ix), g.depth.astype(np.float32))
    np.add.at(den, (iy, ix), 1.0)
    num_b = cv2.GaussianBlur(num, (0, 0), sigma / step)
    den_b = cv2.GaussianBlur(den, (0, 0), sigma / step)
    surf = np.where(den_b > 1e-4, num_b / np.maximum(den_b, 1e-4), 0.0).astype(np.float32)
    n = int(np.size(x))
    rows = -(-n // 4096)  # remap wants 2-D maps under 32k a side
    mx = np.zeros(rows * 4096, np.float32) - 1e4
    my = mx.copy()
    mx[:n] = (np.ravel(x) - x0) / step
    my[:n] = (np.ravel(y) - y0) / step
    d = _remap(surf, np.stack([mx, my], axis=-1).reshape(rows, -1, 2), cv2.BORDER_CONSTANT)
    u, v = g.frame.uv(x, y)
    return d.ravel()[:n].reshape(np.shape(x)) * _falloff(_oval_r(g, u, v), 0.85, 1.1)


def _head_field(g: _Geometry, x: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """Head pose per degree and breath per pixel. Yaw and pitch turn the face surface around
    the head's own axis (displacement grows with depth), so the outline, hair and background
    stay put; roll turns the head around the neck; breath bobs the head."""
    u, v = g.frame.uv(x, y)
    if kind == "yaw":
        return g.frame.to_xy(_depth_map(g, x, y) * _DEG, 0.0)
    if kind == "pitch":
        return g.frame.to_xy(0.0, _depth_map(g, x, y) * _DEG)
    head = _falloff(_oval_r(g, u, v), 1.0, 1.3)
    if kind == "roll":
        pivot_v = g.uv[fr.CHIN, 1] + 0.15 * g.face_h
        return g.frame.to_xy(-(v - pivot_v) * _DEG * head, u * _DEG * head)
    return g.frame.to_xy(0.0, head)  # breath


_FieldFn = Callable[[_Geometry, np.ndarray, np.ndarray], np.ndarray]


def _lips(amount: float) -> _FieldFn:
    return lambda g, x, y: _lips_field(g, x, y, amount)


def _head(kind: str) -> _FieldFn:
    return lambda g, x, y: _head_field(g, x, y, kind)


_SHARP: dict[str, _FieldFn] = {
    "jaw": _jaw_field,
    "spread": _lips(0.16),
    "round": _lips(-0.22),
    "brow": _brow_field,
}
_SMOOTH: dict[str, _FieldFn] = {k: _head(k) for k in ("yaw", "pitch", "roll", "breath")}


# --- preparation -------------------------------------------------------------------------------


def _bbox(d: np.ndarray) -> Box | None:
    ys, xs = np.nonzero(np.abs(d).max(axis=-1) > 1e-4)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _median_colour(image: np.ndarray, mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    pixels = image[mask > 0]
    if len(pixels) < 4:
        return fallback.astype(np.float32)
    return np.median(pixels, axis=0).astype(np.float32)


def build_rig(image: np.ndarray, landmarks: np.ndarray) -> WarpRig:
    """All the heavy work for one avatar: fields, the ROI they touch, painting colours."""
    if image.shape != (FRAME_SIZE, FRAME_SIZE, 3) or image.dtype != np.uint8:
        raise AvatarError(f"the warp engine takes a {FRAME_SIZE}x{FRAME_SIZE} RGB uint8 image")
    g = _geometry(landmarks)
    size = FRAME_SIZE
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    track = g.lm[_TRACK_IDS]
    # contour points sit on the lip split: look the fields up just on their own side of it
    side = np.zeros((len(track), 1))
    side[_LIP_UP], side[_LIP_LO] = -1.5, 1.5
    probe = track + side * g.frame.ev

    full = {k: fn(g, xs, ys) for k, fn in {**_SHARP, **_SMOOTH}.items()}
    boxes = [b for b in map(_bbox, full.values()) if b is not None]
    x0, y0 = max(min(b[0] for b in boxes) - 1, 0), max(min(b[1] for b in boxes) - 1, 0)
    x1, y1 = min(max(b[2] for b in boxes) + 1, size), min(max(b[3] for b in boxes) + 1, size)
    # the ROI in whole low-resolution cells, so the upsampled fields line up with their grid
    w = min(-(-(x1 - x0) // _LOWRES) * _LOWRES, size)
    h = min(-(-(y1 - y0) // _LOWRES) * _LOWRES, size)
    x0, y0 = min(x0, size - w), min(y0, size - h)
    grid = np.stack(np.meshgrid(np.arange(x0, x0 + w), np.arange(y0, y0 + h)), -1)

    sharp = {}
    for name, fn in _SHARP.items():
        b = _bbox(full[name])
        if b is not None:
            data = np.ascontiguousarray(full[name][b[1] : b[3], b[0] : b[2]])
            box = (b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0)
            sharp[name] = _Field(data, fn(g, probe[:, 0], probe[:, 1]), box)
    # smooth fields sampled where cv2.resize (INTER_LINEAR) reads its source pixels
    ly, lx = np.mgrid[0 : h // _LOWRES, 0 : w // _LOWRES].astype(np.float64)
    lxs, lys = x0 + (lx + 0.5) * _LOWRES - 0.5, y0 + (ly + 0.5) * _LOWRES - 0.5
    smooth = {}
    for name, fn in _SMOOTH.items():
        bx0, by0, bx1, by1 = _bbox(full[name]) or (x0, y0, x0 + 1, y0 + 1)
        m = _LOWRES + 1  # upsampling leaks a little past the support
        box = (
            max(bx0 - x0 - m, 0),
            max(by0 - y0 - m, 0),
            min(bx1 - x0 + m, w),
            min(by1 - y0 + m, h),
        )
        smooth[name] = _Field(fn(g, lxs, lys), fn(g, probe[:, 0], probe[:, 1]), box)

    # painting colours from the person's own lips, skin and lids, so they sit in the lighting
    lips = np.zeros((size, size), np.uint8)
    upper_lip = fr.LIPS_UPPER_OUTER + fr.LIPS_UPPER_INNER[::-1]
    lower_lip = fr.LIPS_LOWER_OUTER + fr.LIPS_LOWER_INNER[::-1]
    cv2.fillPoly(
        lips, [np.round(g.lm[ring]).astype(np.int32) for ring in (upper_lip, lower_lip)], 255
    )
    lip_rgb = _median_colour(image, lips, np.array([150, 90, 90]))
    oval = np.zeros((size, size), np.uint8)
    cv2.fillPoly(oval, [np.round(g.lm[fr.FACE_OVAL]).astype(np.int32)], 255)
    skin_rgb = _median_colour(image, oval, np.array([180, 140, 120]))
    light = float(np.clip(skin_rgb.mean() / 150.0, 0.5, 1.05))
    rig = WarpRig(
        image=image.copy(),  # a private copy: it is made read-only below
        roi=(x0, y0, x0 + w, y0 + h),
        grid=grid.astype(np.float32),
        sharp=sharp,
        smooth=smooth,
        track=track.astype(np.float32),
        teeth_height=0.22 * g.mouth_hw,
        cavity_rgb=(lip_rgb * np.array([0.34, 0.17, 0.16]) + 2.0).astype(np.float32),
        tongue_rgb=(lip_rgb * np.array([0.7, 0.42, 0.4])).astype(np.float32),
        teeth_rgb=(np.array([228.0, 212.0, 182.0]) * light).astype(np.float32),
        jaw_max=g.jaw_max,
    )
    fields = [*sharp.values(), *smooth.values()]
    for arr in (rig.image, rig.grid, rig.track, *(f.data for f in fields)):
        arr.flags.writeable = False  # shared by every session: make that a fact
    return rig


# --- drawing -----------------------------------------------------------------------------------


def render(rig: WarpRig, c: Controls) -> np.ndarray:
    """Draw one frame: weighted fields summed into one map, one remap of the part of the ROI
    the active fields touch, then the painted mouth interior and eyelids. Returns a new
    (512, 512, 3) uint8 array."""
    x0, y0, x1, y1 = rig.roi
    out = rig.image.copy()
    track = rig.track.copy()
    boxes = []
    low: Any = None  # the summed low-resolution head fields
    for name, f in rig.smooth.items():
        wt = float(getattr(c, name))
        if wt:
            low = f.data * wt if low is None else cv2.scaleAdd(f.data, wt, low)
            track += f.track * wt
            boxes.append(f.box)
    if low is None:
        mapxy = rig.grid.copy()
    else:
        full = cv2.resize(low, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        mapxy = cv2.subtract(rig.grid, full)
    for name, f in rig.sharp.items():
        wt = float(getattr(c, name))
        if wt:
            win = mapxy[f.box[1] : f.box[3], f.box[0] : f.box[2]]
            cv2.scaleAdd(f.data, -wt, win, dst=win)  # in place on the window
            track += f.track * wt
            boxes.append(f.box)
    if boxes:  # remap only where something moves; elsewhere the photo is already right
        bx0, by0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        bx1, by1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        out[y0 + by0 : y0 + by1, x0 + bx0 : x0 + bx1] = _remap(
            rig.image, mapxy[by0:by1, bx0:bx1], cv2.BORDER_REPLICATE
        )
        track = _refine(mapxy, rig.track, track, x0, y0)
    if c.jaw > 0.0:
        _paint_mouth(rig, out, track[_LIP_UP], track[_LIP_LO], min(1.0, c.jaw / 0.05))
    if c.blink > 0.01:
        for up, lo in _LIDS:
            _paint_lid(out, track[up], track[lo], min(c.blink, 1.0))
    return out


def _refine(mapxy: np.ndarray, src: np.ndarray, guess: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Where the photo's points ``src`` land in the frame: solve map(q) = src by fixed-point
    steps from the first-order ``guess``, so the painting sits exactly on the warped lips."""
    q = guess
    for _ in range(2):
        pts = (q - (x0, y0)).reshape(1, -1, 2).astype(np.float32)
        at = _remap(mapxy, pts, cv2.BORDER_REPLICATE)[0]
        q = q + (src - at)
    return q


@dataclass
class _Span:
    """The pixels between two contours, column by column: where painting happens."""

    ya: int
    xa: int
    t: np.ndarray  # (rows, cols) px below the top contour
    gap: np.ndarray  # (cols,) px from top to bottom contour (0 outside the shared span)
    xn: np.ndarray  # (cols,) 0 at the centre .. 1 at the ends
    dx: np.ndarray  # (cols,) px from the centre


def _span(top: np.ndarray, bottom: np.ndarray, shape: tuple[int, ...], pad: int) -> _Span | None:
    pts = np.vstack([top, bottom])
    xa, ya = max(int(pts[:, 0].min()) - 1, 0), max(int(pts[:, 1].min()) - pad, 0)
    xb = min(int(math.ceil(pts[:, 0].max())) + 2, shape[1])
    yb = min(int(math.ceil(pts[:, 1].max())) + pad, shape[0])
    if xb - xa < 2 or yb - ya < 2:
        return None
    cols = np.arange(xa, xb, dtype=np.float32)
    a = max(top[:, 0].min(), bottom[:, 0].min())
    b = min(top[:, 0].max(), bottom[:, 0].max())
    upper = _interp_contour(cols, top).astype(np.float32)
    gap = _interp_contour(cols, bottom).astype(np.float32) - upper
    gap = np.where((cols > a) & (cols < b) & (gap > 0), gap, np.float32(0))
    rows = np.arange(ya, yb, dtype=np.float32)[:, None]
    dx = cols - np.float32(0.5 * (a + b))
    xn = np.minimum(np.abs(dx) / np.float32(max(0.5 * (b - a), 1.0)), np.float32(1))
    return _Span(ya, xa, rows - upper[None, :], gap, xn, dx)


def _blend(out: np.ndarray, s: _Span, colour: np.ndarray, alpha: np.ndarray) -> None:
    region = out[s.ya : s.ya + alpha.shape[0], s.xa : s.xa + alpha.shape[1]]
    f = region.astype(np.float32)
    f += (colour - f) * alpha[..., None]
    region[...] = np.clip(f + 0.5, 0, 255).astype(np.uint8)


def _paint_mouth(
    rig: WarpRig, out: np.ndarray, top: np.ndarray, bottom: np.ndarray, strength: float
) -> None:
    """Fill the gap between the parted lips: a dark cavity, upper teeth in the lip's shadow,
    a hint of tongue when wide open. Edges are feathered against the lips."""
    s = _span(top, bottom, out.shape, 2)
    if s is None or s.gap.max() < 0.3:
        return
    gap, xn, t = s.gap[None, :], s.xn[None, :], s.t
    cover = _soft(t, 1.2) * _soft(gap - t, 1.5) * np.clip(gap, 0.0, 1.0) * strength
    # upper teeth: a band under the upper lip, shorter and darker towards the corners
    th = np.minimum(0.5 * gap, rig.teeth_height * (1.0 - 0.7 * xn * xn))
    teeth_a = _soft(th - t, 1.8) * (1.0 - _smoothstep((xn - 0.3) / 0.45)) * np.clip(gap / 3, 0, 1)
    shade = (1.0 - 0.6 * xn * xn) * (0.75 + 0.25 * _soft(t - 1.5, 4.0))
    shade = shade * (1.0 - 0.15 * np.exp(-((s.dx[None, :] / 0.8) ** 2)))  # the incisor line
    # cavity: darkest deep inside, tongue rising at the bottom of a wide opening
    tongue_a = _smoothstep((t - 0.55 * gap) / np.maximum(0.45 * gap, 1.0))
    tongue_a = tongue_a * np.clip((gap - 1.5 * rig.teeth_height) / rig.teeth_height, 0, 1) * 0.7
    cav = rig.cavity_rgb * (0.55 + 0.6 * xn[..., None])  # darkest deep in the middle
    cav = cav + (rig.tongue_rgb - cav) * tongue_a[..., None]
    colour = cav + (rig.teeth_rgb * shade[..., None] - cav) * teeth_a[..., None]
    _blend(out, s, colour, cover)


def _paint_lid(out: np.ndarray, top: np.ndarray, bottom: np.ndarray, closed: float) -> None:
    """A blink: the upper lid slides down over the eye (the eye itself does not move), its
    lashes drawn as a dark line along the moving edge. The lid's skin is the skin from just
    under the eye, mirrored up: same texture, same light, same tint behind glasses."""
    s = _span(top, bottom, out.shape, 3)
    if s is None:
        return
    rows, cols = s.t.shape
    edge = (closed * s.gap)[None, :]  # lid edge, px below the upper lid line
    fade = np.clip(s.gap / 2.0, 0.0, 1.0)[None, :]
    cover = _soft(s.t + 1.2, 1.5) * _soft(edge - s.t + 0.3, 1.0) * fade
    below = s.ya - s.t[0] + s.gap  # lower lid row per column
    src_y = below[None, :] + 2.0 + np.abs(edge - s.t)  # mirror around the lid edge
    src_y = np.clip(np.round(src_y), 0, out.shape[0] - 1).astype(np.intp)
    src_x = np.broadcast_to(np.arange(s.xa, s.xa + cols), (rows, cols))
    skin = out[src_y, src_x].astype(np.float32)
    shade = 0.97 - 0.12 * np.clip(s.t / np.maximum(edge, 1.0), 0.0, 1.0)
    colour = skin * shade[..., None] * _LID_TINT
    lash = _soft(0.6 + 0.5 * closed - np.abs(s.t - edge), 1.0) * min(1.0, 3.0 * closed)
    colour = colour + (skin * 0.3 - colour) * lash[..., None]
    _blend(out, s, colour, np.maximum(cover, lash * fade))


# --- audio to controls -------------------------------------------------------------------------

_WINDOW = np.hanning(SAMPLES_PER_FRAME).astype(np.float32)
_FREQS = np.fft.rfftfreq(SAMPLES_PER_FRAME, 1.0 / SAMPLE_RATE)
_VOICE_BAND = (_FREQS >= 200) & (_FREQS <= 4000)
_GATE_DB = -55.0  # quieter than this is silence, whatever the recent level
_RANGE_DB = 26.0  # loudness span below the recent peak that maps to jaw 0..1
_LID_TINT = np.array([0.95, 0.91, 0.89], np.float32)  # lids: a little darker and pinker
_BLINK = (0.5, 1.0, 0.75, 0.35, 0.1)  # per frame: ~200 ms, closing faster than opening


class _Drift:
    """Slow, smooth, seeded head motion: a few incommensurate sines per axis."""

    def __init__(self, rng: np.random.Generator, amplitude: float) -> None:
        self.freq = rng.uniform(0.03, 0.2, 3)
        self.phase = rng.uniform(0.0, 2 * math.pi, 3)
        self.amp = amplitude * rng.uniform(0.5, 1.0, 3) / 1.8

    def __call__(self, t: float) -> float:
        return float(np.sum(self.amp * np.sin(2 * math.pi * self.freq * t + self.phase)))


class WarpStream(EngineStream):
    """One session: speech features -> smoothed controls -> frames. Everything random comes
    from one seeded generator, so the same seed and input give the same frames."""

    frames_per_step = 1

    def __init__(self, rig: WarpRig, seed: int | None = None) -> None:
        self._rig = rig
        self._rng = np.random.default_rng(seed)
        self._frame = 0
        self._yaw, self._pitch, self._roll = (_Drift(self._rng, a) for a in (2.0, 1.2, 0.8))
        self._breath_phase = float(self._rng.uniform(0.0, 2 * math.pi))
        self._next_blink = self._blink_gap()
        self._blink_at = -len(_BLINK)
        self.controls = Controls()  #: the controls of the last frame drawn (for tests, stats)
        self._reset_speech()
        self._jaw = self._spread = self._round = self._brow = self._talk = 0.0

    def _reset_speech(self) -> None:
        self._peak_db = -20.0  # recent loudness peak: makes the mapping level-independent
        self._slow_level = 0.0
        self._centroid = 1300.0  # the voice's typical spectral centroid, Hz

    def _blink_gap(self) -> int:
        return self._frame + int(self._rng.uniform(2.0, 6.0) * FPS)

    def reset(self) -> None:
        """Barge-in: forget the speech context; the mouth closes with its normal release
        (a few frames), so there is no jump."""
        self._reset_speech()

    def step(self, speech: np.ndarray | None) -> np.ndarray:
        self.controls = self._advance(speech)
        return render(self._rig, self.controls)[None]

    def _analyse(self, speech: np.ndarray | None) -> tuple[float, float]:
        """(loudness 0..1 relative to the recent peak, spectral tilt -1 round .. 1 spread)."""
        if speech is None:
            return 0.0, 0.0
        x = np.asarray(speech, dtype=np.float32).reshape(-1)
        if x.size != SAMPLES_PER_FRAME:
            raise ValueError(f"expected {SAMPLES_PER_FRAME} samples, got {x.size}")
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
        db = 20.0 * math.log10(rms + 1e-9)
        self._peak_db = max(db, self._peak_db - 0.06, -45.0)  # ~1.5 dB/s release
        if db < _GATE_DB:
            return 0.0, 0.0
        level = float(np.clip((db - (self._peak_db - _RANGE_DB)) / (_RANGE_DB - 3.0), 0.0, 1.0))
        power = np.abs(np.fft.rfft(x * _WINDOW)) ** 2
        band = power[_VOICE_BAND]
        centroid = float(np.dot(band, _FREQS[_VOICE_BAND]) / max(float(band.sum()), 1e-12))
        # front vowels (ee, eh) put energy high (F2 ~2 kHz), rounded ones (oo, oh) low;
        # measured against this voice's own average, so any voice uses both shapes
        if level > 0.3:
            self._centroid += (centroid - self._centroid) * 0.05
        return level, float(np.clip((centroid - self._centroid) / 500.0, -1.0, 1.0))

    def _advance(self, speech: np.ndarray | None) -> Controls:
        level, tilt = self._analyse(speech)
        jaw_target = 0.8 * level**1.6  # expand: vowels open, consonants nearly close
        self._jaw += (jaw_target - self._jaw) * (0.7 if jaw_target > self._jaw else 0.5)
        voiced = min(1.0, 2.0 * level)
        spread_t, round_t = max(tilt, 0.0) * voiced, max(-tilt, 0.0) * voiced
        self._spread += (spread_t - self._spread) * 0.35
        self._round += (round_t - self._round) * 0.35
        # emphasis: a loudness onset well above the recent average lifts the brows
        onset = level - self._slow_level
        self._slow_level += (level - self._slow_level) * 0.08
        brow_t = float(np.clip((onset - 0.3) * 2.0, 0.0, 0.8))
        self._brow += (brow_t - self._brow) * (0.3 if brow_t > self._brow else 0.06)
        self._talk += (level - self._talk) * 0.05

        t = self._frame / FPS
        if self._frame >= self._next_blink:
            self._blink_at, self._next_blink = self._frame, self._blink_gap()
        k = self._frame - self._blink_at
        blink = _BLINK[k] if 0 <= k < len(_BLINK) else 0.0
        self._frame += 1
        return Controls(
            jaw=self._jaw,
            spread=self._spread,
            round=self._round,
            blink=blink,
            brow=self._brow,
            yaw=self._yaw(t) * (1.0 + 0.5 * self._talk),
            pitch=self._pitch(t) + 0.8 * self._talk - 1.0 * self._brow,
            roll=self._roll(t),
            breath=0.6 * math.sin(2 * math.pi * 0.25 * t + self._breath_phase),
        )


# --- engine ------------------------------------------------------------------------------------


class WarpEngine(Engine):
    """The CPU animator. ``prepare`` costs ~0.3 s per photo; a frame a few milliseconds."""

    name = "warp"
    worker_threads = 2

    def prepare(self, image: np.ndarray, avatar_id: str) -> Avatar:
        """``image`` is normally the 512x512 reference crop (``avatar.reference_image``);
        any other RGB photo is cropped to one first."""
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise AvatarError(f"expected an RGB uint8 image, got {image.shape} {image.dtype}")
        if image.shape[:2] != (FRAME_SIZE, FRAME_SIZE):
            from avatar_stream.avatar import reference_image  # imports the rig's models

            image = reference_image(image)
        face = fr.get_rigger().rig(image)
        rig = build_rig(image, face.landmarks)
        return Avatar(
            id=avatar_id,
            image=rig.image,
            face_box=face.face_box,
            mouth_box=face.mouth_box,
            data=rig,
            meta={"engine": self.name},
        )

    def open_stream(self, avatar: Avatar, seed: int | None = None) -> WarpStream:
        if not isinstance(avatar.data, WarpRig):
            raise ValueError(f"avatar {avatar.id!r} was not prepared by the warp engine")
        return WarpStream(avatar.data, seed)

    def warm_up(self) -> None:
        """Load the face models before the first photo arrives."""
        fr.get_rigger()
