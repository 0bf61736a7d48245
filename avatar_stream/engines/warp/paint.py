"""One frame from a rig and its controls: the summed fields as one backward map and a
single remap over the region they touch, then what a warp cannot show painted on (the
mouth's inside, closed eyelids)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from avatar_stream.engines.base import (
    Box,
)
from avatar_stream.engines.warp.rig import (
    BLINK_DRAWN,
    LIDS,
    LIP_LO,
    LIP_UP,
    Controls,
    WarpRig,
    interp_contour,
    remap,
    smoothstep,
    soft,
)

_LID_TINT = np.array([0.95, 0.91, 0.89], np.float32)  # lids: a little darker and pinker


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
        _paint_mouth(rig, out, track[LIP_UP], track[LIP_LO], mouth_paint(c))
    if c.blink > BLINK_DRAWN:
        for up, lo in LIDS:
            _paint_lid(out, track[up], track[lo], min(c.blink, 1.0))
    return out


def mouth_paint(c: Controls) -> float:
    """How opaque the painted mouth is: full from a jaw of 0.05."""
    return min(1.0, max(c.jaw, 0.0) / 0.05)


def _refine(mapxy: np.ndarray, src: np.ndarray, guess: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Where the photo's points ``src`` land in the frame: solve map(q) = src by fixed-point
    steps from the first-order ``guess``, so the painting sits exactly on the warped lips."""
    q = guess
    for _ in range(2):
        pts = (q - (x0, y0)).reshape(1, -1, 2).astype(np.float32)
        at = remap(mapxy, pts, cv2.BORDER_REPLICATE)[0]
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
    upper = interp_contour(cols, top).astype(np.float32)
    gap = interp_contour(cols, bottom).astype(np.float32) - upper
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
    cover = soft(t, 1.1) * soft(gap - t, 1.3) * np.clip(gap, 0.0, 1.0) * strength
    # paint only where the lips actually parted: the photo's own gap between closed lips
    # (largest near the corners, where the lips do not part) stays the photo's
    cols = np.arange(s.xa, s.xa + t.shape[1], dtype=np.float32)
    rest = interp_contour(cols, rig.track[LIP_LO]) - interp_contour(cols, rig.track[LIP_UP])
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
        tongue_a = soft(t - tongue_top, 1.6) * np.clip(hump / 2.0, 0.0, 1.0)
        lit = 0.55 + 0.45 * np.exp(-np.maximum(t - tongue_top, 0.0) / 2.5)  # its top is lit
        colour += (rig.tongue_rgb * lit[..., None] - colour) * tongue_a[..., None]
        # lower teeth: only their tips show above the lower lip
        low_h = 0.3 * th0 * np.clip((gap - 1.8 * th0) / th0, 0.0, 1.0) * (1.0 - xn * xn)
        low_a = soft(t - (gap - low_h), 1.0) * (1.0 - smoothstep((xn - 0.25) / 0.35)) * 0.4
        colour += (0.5 * (rig.teeth_rgb + rig.mucosa_rgb) - colour) * low_a[..., None]
    colour = colour * occlusion[..., None]
    # where the opening tapers into the corners it is lip tissue, not a black hole
    corner = 0.7 * smoothstep((xn - 0.55) / 0.4)
    colour = colour + (rig.mucosa_rgb - colour) * corner[..., None]
    # upper teeth along an arch: incisors wide, the side teeth narrower and turned away
    arch = 1.05 * max(float(np.abs(s.dx).max()), 1.0)
    along = arch * np.arcsin(np.clip(np.abs(s.dx) / arch, 0.0, 0.999))  # px along the arch
    edges = np.array([0.0, 0.36, 0.64, 0.9, 1.15]) * arch  # tooth boundaries along the arch
    seam = np.min(np.abs(along[:, None] - edges[None, :]), axis=1)[None, :]
    notch = np.exp(-((seam / (0.8 + 0.03 * arch)) ** 2))
    th = np.minimum(0.6 * gap, th0 * (1.0 - 0.55 * xn * xn)) - 0.1 * th0 * notch
    teeth_a = soft(th - t, 1.0) * (1.0 - smoothstep((xn - 0.5) / 0.4)) * np.clip(gap / 2.5, 0, 1)
    shade = 0.5 + 0.5 * smoothstep((t + 0.5) / (0.35 * th0 + 1.0))  # the upper lip's shadow
    shade = shade * (1.0 - 0.6 * xn**1.5) * (1.0 - 0.25 * notch * (1.0 - xn))
    shade = shade * (0.86 + 0.14 * soft(th - t - 1.2, 1.5))  # translucent biting edges
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
    cover = soft(s.t + 1.2, 1.5) * soft(edge - s.t + 0.3, 1.0) * fade
    below = s.ya - s.t[0] + s.gap  # lower lid row per column
    src_y = below[None, :] + 2.0 + np.abs(edge - s.t)  # mirror around the lid edge
    src_y = np.clip(np.round(src_y), 0, out.shape[0] - 1).astype(np.intp)
    src_x = np.broadcast_to(np.arange(s.xa, s.xa + cols), (rows, cols))
    skin = out[src_y, src_x].astype(np.float32)
    shade = 0.97 - 0.12 * np.clip(s.t / np.maximum(edge, 1.0), 0.0, 1.0)
    colour = skin * shade[..., None] * _LID_TINT
    lash = soft(0.6 + 0.5 * closed - np.abs(s.t - edge), 1.0) * min(1.0, 3.0 * closed)
    colour = colour + (skin * 0.3 - colour) * lash[..., None]
    _blend(out, s, colour, np.maximum(cover, lash * fade))
