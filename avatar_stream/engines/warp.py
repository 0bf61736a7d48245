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

import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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

log = logging.getLogger(__name__)

_NOSE_BOTTOM = 2  # face-mesh point under the nose (subnasale)
_DEG = math.pi / 180.0
_LOWRES = 4  # head fields are smooth: stored at 1/4 resolution, upsampled per frame
_BLINK_DRAWN = 0.01  # lids are painted from this much closed
#: a stream draws a new frame once its controls could have moved a pixel this far since the
#: last frame drawn; until then it shows that one again
REDRAW_PX = 0.3

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
    cavity_rgb: np.ndarray  # (3,) float32 colours of the painted parts: the dark back,
    mucosa_rgb: np.ndarray  # the warm wet skin just inside the lips,
    tongue_rgb: np.ndarray
    teeth_rgb: np.ndarray
    grain: np.ndarray  # (512, 512) float32: the photo's own noise, laid over the painting
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
    below = lens + (1.0 - lens) * _smoothstep(t / (2.5 * g.jaw_max))
    chin_v = g.uv[fr.CHIN, 1]
    du = u
    # the drop fades out sideways over at least 1.8 jaw_max (a steeper fade shears the skin
    # into streaks and, past a slope of 1, folds it); how far down it reaches is set by the
    # jaw line (the lower face outline) under each point, below which the neck stretches
    oval = g.ids(fr.FACE_OVAL)
    lower = oval[oval[:, 1] > 0]
    inner = 0.9 * g.mouth_hw + 0.1 * np.clip(t, 0.0, chin_v)
    outer = inner + max(1.8 * g.jaw_max, 0.22 * g.face_w)
    lateral = _falloff(np.abs(du), inner, outer)
    gain = 1.0 + 0.2 * np.clip(t / max(chin_v, 1.0), 0.0, 1.0)
    # below the jaw line (the lower face outline) the neck stretches and the motion fades
    by_u = np.argsort(lower[:, 0])
    jaw_line = np.interp(u, lower[by_u, 0], lower[by_u, 1])
    neck = _falloff(v - jaw_line, 0.0, 0.36 * g.face_h)
    # the cheeks beside the mouth follow the jaw a little, fading out towards the eyes
    eye_v = float(g.ids([*fr.LEFT_EYE_CORNERS, *fr.RIGHT_EYE_CORNERS])[:, 1].mean())
    beside = _smoothstep((np.abs(du) - 0.5 * g.mouth_hw) / (0.8 * g.mouth_hw))
    inside = _falloff(_oval_r(g, u, v), 0.7, 0.95)
    cheek = 0.2 * beside * _falloff(-v, 0.0, 0.8 * abs(eye_v)) * inside * neck
    drop = 1.0 - (1.0 - below * lateral * gain) * (1.0 - cheek)
    dv_lower = np.where(t >= 0.0, drop * neck, 0.0)
    nose_gap = max(float(-g.uv[_NOSE_BOTTOM, 1]), 4.0)
    lift = _falloff(np.clip(split_up - v, 0.0, None), 0.0, 1.2 * nose_gap)
    dv_upper = np.where(t < 0.0, -0.1 * lens * lift + cheek, 0.0)
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


def _grain(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Noise with the photo's own grain strength (robust std of its fine detail on the face):
    painted areas without it look pasted on, too clean for the photo around them."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    detail = grey - cv2.GaussianBlur(grey, (0, 0), 1.0)
    values = detail[mask > 0]
    sigma = 1.4826 * float(np.median(np.abs(values))) if values.size else 2.0
    white = np.random.default_rng(0).standard_normal(image.shape[:2]).astype(np.float32)
    noise = np.asarray(cv2.GaussianBlur(white, (0, 0), 0.6))  # photo grain is a little soft
    scale = np.clip(sigma, 0.8, 6.0) / max(float(noise.std()), 1e-6)
    return (noise * scale).astype(np.float32)


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
        cavity_rgb=(lip_rgb * np.array([0.25, 0.095, 0.08]) + 1.5).astype(np.float32),
        mucosa_rgb=(lip_rgb * np.array([0.62, 0.3, 0.27])).astype(np.float32),
        tongue_rgb=(lip_rgb * np.array([0.78, 0.44, 0.42])).astype(np.float32),
        # ivory, lit like the skin and tinted a little by the photo's own colour cast
        teeth_rgb=(np.array([222.0, 210.0, 184.0]) * light * 0.85 + 0.15 * skin_rgb * 1.2)
        .astype(np.float32),
        grain=_grain(image, oval),
        jaw_max=g.jaw_max,
    )
    _freeze(rig)
    return rig


def _freeze(rig: WarpRig) -> None:
    """A rig is shared by every session on every thread: make read-only a fact."""
    fields = [*rig.sharp.values(), *rig.smooth.values()]
    for arr in (rig.image, rig.grid, rig.track, rig.grain, *(f.data for f in fields)):
        arr.flags.writeable = False


# --- drawing -----------------------------------------------------------------------------------


def backward_map(rig: WarpRig, c: Controls) -> np.ndarray:
    """The frame's backward map over the ROI: (h, w, 2) float32 absolute photo coordinates
    each output pixel is sampled from (the weighted sum of the fields)."""
    return _sum_fields(rig, c)[0]


def _sum_fields(rig: WarpRig, c: Controls) -> tuple[np.ndarray, np.ndarray, list[Box]]:
    """(backward map, first-order tracked points, boxes of the active fields)."""
    x0, y0, x1, y1 = rig.roi
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
    return mapxy, track, boxes


def render(rig: WarpRig, c: Controls) -> np.ndarray:
    """Draw one frame: weighted fields summed into one map, one remap of the part of the ROI
    the active fields touch, then the painted mouth interior and eyelids. Returns a new
    (512, 512, 3) uint8 array."""
    x0, y0 = rig.roi[:2]
    out = rig.image.copy()
    mapxy, track, boxes = _sum_fields(rig, c)
    if boxes:  # remap only where something moves; elsewhere the photo is already right
        bx0, by0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        bx1, by1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        # in fixed point (1/32 px): a third faster than the float map, conversion
        # included, and at most 3 levels off it (0.07 on average)
        fixed, frac = cv2.convertMaps(  # type: ignore[call-overload]
            mapxy[by0:by1, bx0:bx1], None, cv2.CV_16SC2
        )
        out[y0 + by0 : y0 + by1, x0 + bx0 : x0 + bx1] = cv2.remap(
            rig.image, fixed, frac, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        track = _refine(mapxy, rig.track, track, x0, y0)
    if c.jaw > 0.0:
        _paint_mouth(rig, out, track[_LIP_UP], track[_LIP_LO], _mouth_paint(c))
    if c.blink > _BLINK_DRAWN:
        for up, lo in _LIDS:
            _paint_lid(out, track[up], track[lo], min(c.blink, 1.0))
    return out


def _mouth_paint(c: Controls) -> float:
    """How opaque the painted mouth is: full from a jaw of 0.05."""
    return min(1.0, max(c.jaw, 0.0) / 0.05)


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
    """Fill the gap between the parted lips with what a camera sees there: upper teeth
    coming out of the upper lip's shadow (separate teeth, receding into the dark towards the
    corners), a warm, dark cavity that is darkest at the back and in the corners, the wet
    inner lip catching some light, the tongue and a hint of lower teeth when wide open, and
    the photo's own grain over all of it. Edges are feathered against the lips."""
    s = _span(top, bottom, out.shape, 2)
    if s is None or s.gap.max() < 0.3:
        return
    gap, xn, t = s.gap[None, :], s.xn[None, :], s.t
    th0 = rig.teeth_height
    cover = _soft(t, 1.1) * _soft(gap - t, 1.3) * np.clip(gap, 0.0, 1.0) * strength
    # paint only where the lips actually parted: the photo's own gap between closed lips
    # (largest near the corners, where the lips do not part) stays the photo's
    cols = np.arange(s.xa, s.xa + t.shape[1], dtype=np.float32)
    rest = _interp_contour(cols, rig.track[_LIP_LO]) - _interp_contour(cols, rig.track[_LIP_UP])
    cover = cover * np.clip((gap - np.maximum(rest, 0.0)[None, :]) / 1.5, 0.0, 1.0)
    occlusion = 1.0 - 0.65 * xn * xn  # the corners are deep in shadow
    # cavity: the dark back, warming towards the lower lip's wet inner edge
    rim = np.exp(-np.maximum(gap - t, 0.0) / (0.9 + 0.08 * gap))
    rim = rim + 0.5 * np.exp(-np.maximum(t, 0.0) / (0.8 + 0.05 * gap))
    rim = np.clip(rim, 0.0, 1.0)
    colour = rig.cavity_rgb + (rig.mucosa_rgb - rig.cavity_rgb) * rim[..., None]
    if float(s.gap.max()) > 1.3 * th0:  # wide open (the layers below are empty otherwise)
        # tongue: a rounded hump rising from the bottom of the opening
        hump = (gap - 1.3 * th0).clip(0.0, None) * 0.45 * (1.0 - (xn / 0.8) ** 2).clip(0.0, 1.0)
        tongue_top = gap - np.minimum(hump, 0.4 * gap)
        tongue_a = _soft(t - tongue_top, 1.6) * np.clip(hump / 2.0, 0.0, 1.0)
        lit = 0.55 + 0.45 * np.exp(-np.maximum(t - tongue_top, 0.0) / 2.5)  # its top is lit
        colour += (rig.tongue_rgb * lit[..., None] - colour) * tongue_a[..., None]
        # lower teeth: only their tips show above the lower lip
        low_h = 0.3 * th0 * np.clip((gap - 1.8 * th0) / th0, 0.0, 1.0) * (1.0 - xn * xn)
        low_a = _soft(t - (gap - low_h), 1.0) * (1.0 - _smoothstep((xn - 0.25) / 0.35)) * 0.4
        colour += (0.5 * (rig.teeth_rgb + rig.mucosa_rgb) - colour) * low_a[..., None]
    colour = colour * occlusion[..., None]
    # where the opening tapers into the corners it is lip tissue, not a black hole
    corner = 0.7 * _smoothstep((xn - 0.55) / 0.4)
    colour = colour + (rig.mucosa_rgb - colour) * corner[..., None]
    # upper teeth along an arch: incisors wide, the side teeth narrower and turned away
    arch = 1.05 * max(float(np.abs(s.dx).max()), 1.0)
    along = arch * np.arcsin(np.clip(np.abs(s.dx) / arch, 0.0, 0.999))  # px along the arch
    edges = np.array([0.0, 0.36, 0.64, 0.9, 1.15]) * arch  # tooth boundaries along the arch
    seam = np.min(np.abs(along[:, None] - edges[None, :]), axis=1)[None, :]
    notch = np.exp(-((seam / (0.8 + 0.03 * arch)) ** 2))
    th = np.minimum(0.6 * gap, th0 * (1.0 - 0.55 * xn * xn)) - 0.1 * th0 * notch
    teeth_a = _soft(th - t, 1.0) * (1.0 - _smoothstep((xn - 0.5) / 0.4)) * np.clip(gap / 2.5, 0, 1)
    shade = 0.5 + 0.5 * _smoothstep((t + 0.5) / (0.35 * th0 + 1.0))  # the upper lip's shadow
    shade = shade * (1.0 - 0.6 * xn**1.5) * (1.0 - 0.25 * notch * (1.0 - xn))
    shade = shade * (0.86 + 0.14 * _soft(th - t - 1.2, 1.5))  # translucent biting edges
    # shadowed teeth take the cavity's warm colour, not grey
    teeth = rig.cavity_rgb + (rig.teeth_rgb - rig.cavity_rgb) * shade[..., None]
    colour = colour + (teeth - colour) * teeth_a[..., None]
    grain = rig.grain[s.ya : s.ya + t.shape[0], s.xa : s.xa + t.shape[1]]
    _blend(out, s, colour + grain[..., None], cover)


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


def _band(lo: float, hi: float) -> np.ndarray:
    return (_FREQS >= lo) & (_FREQS < hi)


_LOW, _MID, _HIGH = _band(80, 400), _band(400, 2500), _band(3000, 8000)
_F1_BAND, _F2_BAND = _band(250, 1000), _band(800, 3000)
_GATE_DB = -55.0  # quieter than this is silence, whatever the recent level
_RANGE_DB = 26.0  # loudness span below the recent peak that maps to jaw 0..1
_LID_TINT = np.array([0.95, 0.91, 0.89], np.float32)  # lids: a little darker and pinker
_BLINK = (0.5, 1.0, 0.75, 0.35, 0.1)  # per frame: ~200 ms, closing faster than opening
_DOUBLE_BLINK = 0.2  # chance that a blink comes with a second one right after it
_NOD_HZ, _NOD_DAMPING = 1.1, 0.55  # a nod: a damped swing of the head, pitch only


@dataclass(frozen=True)
class _Sound:
    """What the mouth needs to know about 40 ms of speech (all 0 for silence)."""

    level: float = 0.0  # loudness 0..1 relative to the recent peak
    open: float = 0.0  # vowel height from F1: 0 close (ee, oo) .. 1 open (ah)
    spread: float = 0.0  # front vowels and sibilants (F2 high: ee, eh, s)
    round: float = 0.0  # back rounded vowels (F2 and F1 low: oo, oh)
    closure: float = 0.0  # a murmur behind closed lips (m, b, the voice bar of a stop)
    hiss: float = 0.0  # frication: the teeth nearly together (s, sh, f)


def _clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """np.clip for one number, without numpy's per-call cost (a dozen per frame)."""
    return lo if x < lo else hi if x > hi else float(x)


def _centroid(power: np.ndarray, band: np.ndarray) -> float:
    p = power[band]
    return float(np.dot(p, _FREQS[band]) / max(float(p.sum()), 1e-20))


class _Drift:
    """Slow, smooth, seeded head motion: a few incommensurate sines per axis."""

    def __init__(self, rng: np.random.Generator, amplitude: float) -> None:
        self.freq = rng.uniform(0.03, 0.2, 3)
        self.phase = rng.uniform(0.0, 2 * math.pi, 3)
        self.amp = amplitude * rng.uniform(0.5, 1.0, 3) / 1.8
        self._terms = list(
            zip(self.amp.tolist(), self.freq.tolist(), self.phase.tolist(), strict=True)
        )

    def __call__(self, t: float) -> float:
        return sum(  # per frame: plain floats beat three-element arrays
            a * math.sin(2 * math.pi * f * t + p) for a, f, p in self._terms
        )


class _Nod:
    """A damped spring on head pitch: a kick makes one natural nod (down, back, settle)."""

    def __init__(self) -> None:
        self.angle = self.speed = 0.0
        self._w = 2 * math.pi * _NOD_HZ

    def kick(self, degrees: float) -> None:
        """Start a nod peaking at about ``degrees`` (positive: down)."""
        self.speed += degrees * self._w * 1.6

    def step(self, dt: float) -> float:
        accel = -self._w * self._w * self.angle - 2 * _NOD_DAMPING * self._w * self.speed
        self.speed += accel * dt  # semi-implicit Euler: stable at 25 fps for this spring
        self.angle += self.speed * dt
        return self.angle


class WarpStream(EngineStream):
    """One session: speech features -> smoothed controls -> frames. Everything random comes
    from one seeded generator, so the same seed and input give the same frames.

    Mouth shapes come from the sound itself, 40 ms at a time (no look-ahead, so streaming
    and offline rendering animate the same): loudness opens the jaw, the first formant
    scales it (open vowels wide, close ones narrow), the second sets spread against rounded
    lips, a low murmur with no formants above it (m, b) or silence closes the lips, and
    frication keeps the teeth together. Attack is fast, release a little slower, closures
    fastest, as lips move in speech."""

    frames_per_step = 1

    def __init__(self, rig: WarpRig, seed: int | None = None) -> None:
        self._rig = rig
        # the farthest each control's field moves a pixel, per unit of the control
        self._reach = {
            name: float(np.abs(f.data).max()) for name, f in (rig.sharp | rig.smooth).items()
        }
        self._drawn: tuple[Controls, np.ndarray] | None = None  # the last frame drawn
        self._rng = np.random.default_rng(seed)
        self._frame = 0
        self._yaw, self._pitch, self._roll = (_Drift(self._rng, a) for a in (2.0, 1.2, 0.8))
        self._nod = _Nod()
        self._next_nod = self._frame + int(self._rng.uniform(4.0, 10.0) * FPS)
        self._last_kick = -FPS
        self._breath_phase = float(self._rng.uniform(0.0, 2 * math.pi))
        self._next_blink = self._blink_gap()
        self._blink_at = -len(_BLINK)
        self.controls = Controls()  #: the last step's controls (its frame may be a repeat)
        self.sound = _Sound()  #: the analysis of the last frame's speech (for tests)
        self._reset_speech()
        self._calm_until = 0
        self._jaw = self._spread = self._round = self._brow = self._talk = 0.0

    def _reset_speech(self) -> None:
        self._peak_db = -20.0  # recent loudness peak: makes the mapping level-independent
        self._slow_level = 0.0
        self._f2 = 1500.0  # this voice's typical F2 region centroid, Hz

    def _blink_gap(self) -> int:
        return self._frame + int(self._rng.uniform(2.0, 6.0) * FPS)

    def reset(self) -> None:
        """Barge-in: forget the speech context; the mouth closes at the gentle release rate
        (not the snap of a closure in speech: nothing was said to close it), so there is no
        jump."""
        self._reset_speech()
        self._calm_until = self._frame + FPS // 2

    def step(self, speech: np.ndarray | None) -> np.ndarray:
        c = self.controls = self._advance(speech)
        if self._drawn is None or self._moved(self._drawn[0], c):
            self._drawn = (c, render(self._rig, c))
        return self._drawn[1].copy()[None]

    def _moved(self, drawn: Controls, c: Controls) -> bool:
        """Whether ``c`` would draw a picture visibly different from the one drawn with
        ``drawn``: a blink on either, or the controls' change times their fields' reach
        (an upper bound on how far any pixel moves) over ``REDRAW_PX``. Between blinks the
        idle head drifts by hundredths of a pixel a frame: drawn again every few frames,
        it looks the same and costs half the drawing (and the encoder a picture with
        nothing new)."""
        if drawn.blink > _BLINK_DRAWN or c.blink > _BLINK_DRAWN:
            return True
        if abs(_mouth_paint(c) - _mouth_paint(drawn)) > 0.05:  # its opacity, not a move
            return True
        shift = sum(abs(getattr(c, k) - getattr(drawn, k)) * r for k, r in self._reach.items())
        return shift > REDRAW_PX

    def _analyse(self, speech: np.ndarray | None) -> _Sound:
        if speech is None:
            return _Sound()
        x = np.asarray(speech, dtype=np.float32).reshape(-1)
        if x.size != SAMPLES_PER_FRAME:
            raise ValueError(f"expected {SAMPLES_PER_FRAME} samples, got {x.size}")
        rms = math.sqrt(float(np.dot(x, x)) / x.size)
        db = 20.0 * math.log10(rms + 1e-9)
        self._peak_db = max(db, self._peak_db - 0.06, -45.0)  # ~1.5 dB/s release
        if db < _GATE_DB:
            return _Sound()
        level = _clamp((db - (self._peak_db - _RANGE_DB)) / (_RANGE_DB - 3.0))
        power = np.abs(np.fft.rfft(x * _WINDOW)) ** 2
        low, mid, high = (float(power[b].sum()) + 1e-20 for b in (_LOW, _MID, _HIGH))
        low_mid_db = 10.0 * math.log10(low / mid)
        high_db = 10.0 * math.log10(high / (low + mid))
        # formants measured against this voice's own F2 average, so a higher (or lower)
        # voice uses the whole range of shapes too
        f2 = _centroid(power, _F2_BAND)
        if level > 0.3 and high_db < -5.0:  # voiced, not a hiss
            self._f2 += (f2 - self._f2) * 0.03
        scale = _clamp(1500.0 / self._f2, 0.75, 1.3)
        f1, f2 = _centroid(power, _F1_BAND) * scale, f2 * scale
        vowel_open = _clamp((f1 - 320.0) / 330.0)
        return _Sound(
            level=level,
            open=vowel_open,
            spread=_clamp((f2 - 1750.0) / 600.0),
            round=_clamp((2000.0 - f2) / 700.0) * _clamp((650.0 - f1) / 250.0),
            # lips shut on a voiced murmur: strong low band, nothing above it
            closure=_clamp((low_mid_db - 3.0) / 6.0) * _clamp((-high_db - 18.0) / 5),
            hiss=_clamp((high_db + 5.0) / 10.0),
        )

    def _advance(self, speech: np.ndarray | None) -> Controls:
        sound = self.sound = self._analyse(speech)
        # loudness leads (it is what a viewer checks the lips against); the vowel only
        # scales it, and closures and hisses close it
        shape = (0.65 + 0.35 * sound.open) * (1.0 - sound.closure) * (1.0 - 0.6 * sound.hiss)
        jaw_target = 0.8 * sound.level**1.6 * shape  # expand: vowels open, consonants close
        if jaw_target >= self._jaw:
            rate = 0.7
        elif jaw_target < 0.4 * self._jaw and self._frame >= self._calm_until:
            rate = 0.7  # a closure in speech (stop, m, pause): the lips meet fast
        else:
            rate = 0.5
        self._jaw += (jaw_target - self._jaw) * rate
        voiced = min(1.0, 2.0 * sound.level) * (1.0 - sound.closure)
        spread_t = max(sound.spread, 0.6 * sound.hiss) * voiced
        round_t = sound.round * voiced
        self._spread += (spread_t - self._spread) * 0.35
        self._round += (round_t - self._round) * 0.35
        # emphasis: a loudness onset well above the recent average lifts the brows and
        # nods the head
        onset = sound.level - self._slow_level
        self._slow_level += (sound.level - self._slow_level) * 0.08
        brow_t = _clamp((onset - 0.3) * 2.0, 0.0, 0.8)
        self._brow += (brow_t - self._brow) * (0.3 if brow_t > self._brow else 0.06)
        self._talk += (sound.level - self._talk) * 0.05
        if brow_t > 0.3 and self._frame - self._last_kick > 0.8 * FPS:
            self._nod.kick(0.8 + 1.2 * brow_t)
            self._last_kick = self._frame
        if self._frame >= self._next_nod:  # now and then a small nod of its own
            if self._talk < 0.2:
                self._nod.kick(float(self._rng.uniform(0.4, 0.9)))
                self._last_kick = self._frame
            self._next_nod = self._frame + int(self._rng.uniform(4.0, 10.0) * FPS)
        nod = self._nod.step(1.0 / FPS)

        t = self._frame / FPS
        if self._frame >= self._next_blink:
            self._blink_at = self._frame
            if self._rng.uniform() < _DOUBLE_BLINK:
                self._next_blink = self._frame + int(self._rng.integers(8, 12))
            else:
                self._next_blink = self._blink_gap()
        k = self._frame - self._blink_at
        blink = _BLINK[k] if 0 <= k < len(_BLINK) else 0.0
        self._frame += 1
        breath = math.sin(2 * math.pi * 0.25 * t + self._breath_phase)
        return Controls(
            jaw=self._jaw,
            spread=self._spread,
            round=self._round,
            blink=blink,
            brow=self._brow,
            yaw=self._yaw(t) * (1.0 + 0.5 * self._talk),
            pitch=self._pitch(t) + 0.8 * self._talk - 1.0 * self._brow + nod + 0.15 * breath,
            roll=self._roll(t),
            breath=0.6 * breath,
        )


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
    fields: dict[str, dict[str, _Field]] = {"sharp": {}, "smooth": {}}
    for key in z:
        if key.endswith(".data"):
            kind, name, _ = key.split(".")
            box = tuple(int(v) for v in z[f"{kind}.{name}.box"])
            fields[kind][name] = _Field(z[key], z[f"{kind}.{name}.track"], box)  # type: ignore[arg-type]
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
    _freeze(rig)
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


# --- engine ------------------------------------------------------------------------------------


class WarpEngine(Engine):
    """The CPU animator. ``prepare`` costs ~0.4 s per new photo (a few ms when its rig is in
    the disk cache); a frame a few milliseconds."""

    name = "warp"
    # a session's steps run one after another, each waiting on the event loop between
    # them: with fewer threads than sessions they also queue behind each other's, which
    # made a tenth of the frames late at 3 sessions on 2 cores (4 threads: a fortieth)
    worker_threads = 4

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
        rig = cached_rig(image, face.landmarks)
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
