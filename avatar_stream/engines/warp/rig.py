"""The rig: a photo's face geometry from its 468 landmarks, and the displacement fields
built from it once per photo (jaw, lips, brows, head turns, breathing), stored at a quarter
resolution where they are smooth."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from avatar_stream.avatars import facerig as fr
from avatar_stream.engines.base import (
    FRAME_SIZE,
    AvatarError,
    Box,
)

_NOSE_BOTTOM = 2  # face-mesh point under the nose (subnasale)
_DEG = math.pi / 180.0
_LOWRES = 4  # head fields are smooth: stored at 1/4 resolution, upsampled per frame
BLINK_DRAWN = 0.01  # lids are painted from this much closed
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
LIP_UP, LIP_LO = _SLICES[0], _SLICES[1]
LIDS = ((_SLICES[2], _SLICES[3]), (_SLICES[4], _SLICES[5]))
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
class Field:
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
    sharp: dict[str, Field]  # full resolution, own windows (jaw, lips, brow)
    smooth: dict[str, Field]  # 1/_LOWRES resolution, whole ROI (head pose, breath)
    track: np.ndarray  # (n_track, 2) float32 contour points in the photo
    teeth_height: float  # most upper teeth shown, px
    cavity_rgb: np.ndarray  # (3,) float32 colours of the painted parts: the dark back,
    mucosa_rgb: np.ndarray  # the warm wet skin just inside the lips,
    tongue_rgb: np.ndarray
    teeth_rgb: np.ndarray
    grain: np.ndarray  # (512, 512) float32: the photo's own noise, laid over the painting
    jaw_max: float  # px the lower lip drops at jaw = 1


# --- shaping helpers ---------------------------------------------------------------------------


def smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, zero slope at both ends: the falloff that never shows a seam."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _falloff(dist: np.ndarray, inner: Any, outer: Any) -> np.ndarray:
    """1 inside ``inner``, 0 beyond ``outer``, smooth in between (compact support)."""
    return 1.0 - smoothstep((dist - inner) / np.maximum(outer - inner, 1e-6))


def soft(d: np.ndarray, width: float) -> np.ndarray:
    """Coverage of a pixel at signed distance ``d`` inside an edge: antialiasing/feathering."""
    return np.clip(d / width + 0.5, 0.0, 1.0)


def remap(src: np.ndarray, mapxy: np.ndarray, border: int) -> np.ndarray:
    """Bilinear lookup of ``src`` at the absolute (x, y) coordinates in ``mapxy``."""
    out = cv2.remap(  # type: ignore[call-overload]
        src, mapxy, None, cv2.INTER_LINEAR, borderMode=border
    )
    return np.asarray(out)


def interp_contour(u: np.ndarray, pts: np.ndarray) -> np.ndarray:
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
    split = interp_contour(u, np.vstack([g.ids(fr.LIPS_LOWER_INNER), corners]))
    split_up = interp_contour(u, np.vstack([g.ids(fr.LIPS_UPPER_INNER), corners]))
    t = v - split  # depth below the lip line
    lens = _lens(g, u)
    # below the lips the drop starts at ``lens`` (the lips part) and reaches 1 further down;
    # outside the corners it starts at 0 (the cheeks stretch)
    below = lens + (1.0 - lens) * smoothstep(t / (2.5 * g.jaw_max))
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
    beside = smoothstep((np.abs(du) - 0.5 * g.mouth_hw) / (0.8 * g.mouth_hw))
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
        brow_v = interp_contour(u, brow)
        lid_v = interp_contour(u, g.ids(lid_ids))
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
    d = remap(surf, np.stack([mx, my], axis=-1).reshape(rows, -1, 2), cv2.BORDER_CONSTANT)
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
    side[LIP_UP], side[LIP_LO] = -1.5, 1.5
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
            sharp[name] = Field(data, fn(g, probe[:, 0], probe[:, 1]), box)
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
        smooth[name] = Field(fn(g, lxs, lys), fn(g, probe[:, 0], probe[:, 1]), box)

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
    freeze(rig)
    return rig


def freeze(rig: WarpRig) -> None:
    """A rig is shared by every session on every thread: make read-only a fact."""
    fields = [*rig.sharp.values(), *rig.smooth.values()]
    for arr in (rig.image, rig.grid, rig.track, rig.grain, *(f.data for f in fields)):
        arr.flags.writeable = False
