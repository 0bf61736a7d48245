"""Photo ranking: which of a person's photos animates best.

Which photo becomes the reference matters more than any engine setting: a sharp, evenly
lit, frontal photo with open eyes and a closed mouth animates well; a blurred, tilted or
squinting one never will. ``score_photo`` measures exactly those things from the face rig,
and ``avatar-stream avatars rank DIR`` recommends the best of a folder."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avatar_stream.avatars.facerig import (
    FaceRig,
    PhotoError,
    check_pose,
    get_rigger,
)
from avatar_stream.avatars.photo import ImageSource, load_image
from avatar_stream.engines.base import AvatarError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


# --- scoring a photo ---------------------------------------------------------------------------

#: weights of the parts in the overall score (a weighted geometric mean: one bad part sinks it)
WEIGHTS = {"size": 1.0, "frontal": 1.5, "sharp": 1.5, "exposure": 1.0, "eyes": 1.0,
           "mouth": 1.0, "centred": 0.5}
SHARP_FACE_WIDTH = 200  # px: sharpness is measured with the face scaled to this width
#: Laplacian variance / intensity variance of the face at that width: blurred below LO,
#: crisp above HI (measured: the sample portrait 0.28, blurred by a 2 px Gaussian 0.011)
SHARP_LO, SHARP_HI = 0.02, 0.25


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 1 at ``hi`` (either order), linear between."""
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


@dataclass(frozen=True)
class PhotoScore:
    """How good a photo is as the reference: 0-100 overall, each part 0-1, and why."""

    name: str
    score: float  # 0 (unusable) .. 100
    parts: dict[str, float] = field(default_factory=dict)
    measures: dict[str, float] = field(default_factory=dict)
    problem: str | None = None  # why it is unusable (score 0), or None
    notes: list[str] = field(default_factory=list)
    #: the problem's code (``not_image``, ``too_small``, ``no_face``, ``face_too_small``,
    #: ``turned_away``, ...: PhotoError's reasons, as the upload refuses with), or None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def score_photo(image: np.ndarray, name: str = "", rig: FaceRig | None = None) -> PhotoScore:
    """Score an RGB photo as a reference: face found and its size, frontal pose (from the
    landmarks' 3-D frame), sharpness, exposure, eyes open, mouth closed, face centred."""
    try:
        rig = rig or get_rigger().rig(image)
    except PhotoError as exc:
        if exc.reason != "turned_away":
            return unusable(name, exc)
        rig = None  # scored below like any photo, with its pose as the problem
    except AvatarError as exc:
        return unusable(name, exc)
    if rig is None:  # turned away: measure the pose without the check
        rig = _rig_unchecked(image)
        if rig is None:
            return PhotoScore(name, 0.0, problem="no face found in the photo", reason="no_face")
    h, w = image.shape[:2]
    x0, y0, x1, y1 = rig.face_box
    face_w, face_h = x1 - x0, y1 - y0
    yaw, pitch, roll = rig.yaw_pitch_roll
    eyes = float(np.mean(rig.eye_openness))
    mouth = rig.mouth_opening
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    face = grey[y0:y1, x0:x1]
    scale = SHARP_FACE_WIDTH / max(face_w, 1)
    small = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    inner = small[small.shape[0] // 6 : -small.shape[0] // 6 or None,
                  small.shape[1] // 6 : -small.shape[1] // 6 or None]  # skip hair and edges
    # fine detail relative to the face's contrast: a dark or flat photo is not a blurred one
    inner = inner.astype(np.float32)
    sharpness = float(cv2.Laplacian(inner, cv2.CV_32F).var()) / max(float(inner.var()), 1.0)
    light = float(face.mean()) / 255.0
    clipped = float(((face >= 250) | (face <= 5)).mean())
    # room around the face for the 512x512 crop (outside the photo, edges are smeared in)
    side = face_w / 0.45
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    inside = (min(cx + side / 2, w) - max(cx - side / 2, 0)) * (
        min(cy + side / 2, h) - max(cy - side / 2, 0)) / (side * side)
    off_centre = math.hypot((cx - w / 2) / w, (cy - h / 2) / h)
    measures = {
        "face_width_px": float(face_w), "face_height_px": float(face_h),
        "yaw_deg": yaw, "pitch_deg": pitch, "roll_deg": roll,
        "sharpness": sharpness, "brightness": light, "clipped": clipped,
        "eye_openness": eyes, "mouth_opening": mouth, "crop_inside": inside,
        "off_centre": off_centre,
    }
    # the landmark model reads a frontal face as pitch ~ -8: measure from there
    turn = math.hypot(yaw / 20.0, max(abs(pitch + 5.0) - 8.0, 0.0) / 15.0)
    parts = {
        "size": _ramp(face_w, 80, 230),  # 230 px: the face in the 512 crop, not upscaled
        "frontal": math.exp(-turn * turn) * math.exp(-((roll / 15.0) ** 2)),
        "sharp": _ramp(math.log(max(sharpness, 1e-3)), math.log(SHARP_LO), math.log(SHARP_HI)),
        "exposure": min(_ramp(light, 0.12, 0.35), _ramp(light, 0.9, 0.7))
        * (1.0 - min(clipped * 4, 0.8)),
        "eyes": _ramp(eyes, 0.08, 0.2),
        "mouth": _ramp(mouth, 0.06, 0.015),
        "centred": min(_ramp(inside, 0.5, 0.95), _ramp(off_centre, 0.45, 0.15)),
    }
    total = sum(WEIGHTS.values())
    score = 100.0 * math.exp(
        sum(WEIGHTS[k] * math.log(max(v, 1e-3)) for k, v in parts.items()) / total
    )
    notes = _notes(parts, measures)
    problem = reason = None
    try:
        check_pose(rig.landmarks)
    except PhotoError as exc:
        problem, reason, score = str(exc), exc.reason, 0.0
    return PhotoScore(name, round(score, 1), {k: round(v, 3) for k, v in parts.items()},
                      {k: round(float(v), 3) for k, v in measures.items()}, problem, notes,
                      reason)


def unusable(name: str, exc: AvatarError) -> PhotoScore:
    """A photo that cannot be a reference at all: score 0 with the reason."""
    reason = exc.reason if isinstance(exc, PhotoError) else "unusable"
    return PhotoScore(name, 0.0, problem=str(exc), reason=reason)


def _rig_unchecked(image: np.ndarray) -> FaceRig | None:
    """The largest face's landmarks, without the reference-photo checks."""
    rigger = get_rigger()
    rigs = [rigger.landmarks(image, face) for face in rigger.detect(image)]
    rigs = [r for r in rigs if r.score >= 0.5]
    return max(rigs, key=lambda r: r.face_box[2] - r.face_box[0]) if rigs else None


def _notes(parts: dict[str, float], m: dict[str, float]) -> list[str]:
    """Plain words for the parts that cost the most."""
    notes = []
    if parts["size"] < 0.5:
        notes.append(f"small face ({m['face_width_px']:.0f} px wide)")
    if parts["frontal"] < 0.6:
        notes.append(f"turned or tilted (yaw {m['yaw_deg']:.0f}, pitch {m['pitch_deg']:.0f}, "
                     f"roll {m['roll_deg']:.0f} degrees)")
    if parts["sharp"] < 0.5:
        notes.append("blurred")
    if parts["exposure"] < 0.5:
        notes.append("too dark" if m["brightness"] < 0.35 else "too bright or clipped")
    if parts["eyes"] < 0.5:
        notes.append("eyes closed or squinting")
    if parts["mouth"] < 0.5:
        notes.append("mouth open (the reference should have it closed)")
    if parts["centred"] < 0.5:
        notes.append("face near the edge: the crop runs out of photo")
    return notes


def score_file(source: ImageSource, name: str) -> PhotoScore:
    """Score a photo file (path or its bytes); one that is no image scores 0, with why."""
    try:
        image = load_image(source)
    except AvatarError as exc:
        return unusable(name, exc)
    return score_photo(image, name)


def rank_photos(photos: Iterable[Path]) -> list[PhotoScore]:
    """Score every photo file, best first; unusable ones last, with the reason."""
    return best_first(score_file(p, p.name) for p in photos)


def best_first(scores: Iterable[PhotoScore]) -> list[PhotoScore]:
    """The ranking's order: highest score first, ties by name."""
    return sorted(scores, key=lambda s: (-s.score, s.name))


def photos_in(folder: Path) -> list[Path]:
    """The photo files in a folder (not recursive), by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def format_ranking(scores: list[PhotoScore]) -> str:
    """The ranking as a text table and a recommendation."""
    cols = list(WEIGHTS)
    name_w = max([len("photo")] + [len(s.name) for s in scores])
    lines = [f"{'photo':<{name_w}}  score  " + "  ".join(f"{c:>8}" for c in cols) + "  notes"]
    for s in scores:
        parts = "  ".join(f"{s.parts.get(c, 0.0):>8.2f}" for c in cols) if s.parts else \
            "  ".join(f"{'-':>8}" for _ in cols)
        why = s.problem or "; ".join(s.notes)
        lines.append(f"{s.name:<{name_w}}  {s.score:>5.1f}  {parts}  {why}")
    usable = [s for s in scores if s.score > 0]
    if usable:
        lines.append(f"recommended: {usable[0].name} (score {usable[0].score:.1f})")
    else:
        lines.append("recommended: none of these photos can be animated")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``avatar-stream avatars rank DIR``."""
    p = sub.add_parser("avatars", help="manage reference photos")
    what = p.add_subparsers(dest="avatars_command", required=True)
    rank = what.add_parser("rank", help="score the photos in a folder and recommend the best "
                           "reference (face size, frontal pose, sharpness, exposure, eyes "
                           "open, mouth closed, centred)")
    rank.add_argument("folder", type=Path, help="folder of photos of one person")
    rank.add_argument("--json", action="store_true", help="print the scores as JSON")


def main(args: argparse.Namespace) -> int:
    if args.avatars_command == "rank":
        try:
            paths = photos_in(args.folder)
        except FileNotFoundError as exc:
            print(f"avatar-stream: {exc}", file=sys.stderr)
            return 2
        if not paths:
            print(f"avatar-stream: no photos ({', '.join(PHOTO_SUFFIXES)}) in {args.folder}",
                  file=sys.stderr)
            return 2
        scores = rank_photos(paths)
        if args.json:
            print(json.dumps([s.to_json() for s in scores], indent=2))
        else:
            print(format_ranking(scores))
        return 0 if any(s.score > 0 for s in scores) else 1
    return 2
