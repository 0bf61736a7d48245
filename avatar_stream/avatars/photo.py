"""Reference photos: decode, check, and crop to the 512x512 face-centred square the engines take.

One framing for every engine: the face about 45% of the width, centred, eyes a bit above the
middle, hair and shoulders in view. That leaves the warp engine room to move the head, and
gives a generative engine the head-and-shoulders portrait it expects.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path

import cv2
import numpy as np

from avatar_stream.avatars.facerig import (
    LEFT_EYE_CORNERS,
    RIGHT_EYE_CORNERS,
    FaceDetection,
    FaceRig,
    PhotoError,
    get_rigger,
)
from avatar_stream.engines.base import FRAME_SIZE, AvatarError

MIN_IMAGE_SIZE = 128
#: decoding a bigger photo costs too much memory (a small file can hold a huge image)
MAX_IMAGE_PIXELS = 50_000_000
FACE_WIDTH_FRACTION = 0.45  # face (landmark box) width / crop width
EYE_LINE_FRACTION = 0.42  # eye line height / crop height, from the top
DEFAULT_AVATAR_SAMPLE = "grace_hopper.jpg"  # public domain, ships with matplotlib

ImageSource = str | Path | bytes | bytearray | memoryview


def _may_have_alpha(data: bytes) -> bool:
    """PNG and WebP are the formats people upload cut-out portraits in."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _to_rgb8(decoded: np.ndarray) -> np.ndarray:
    """OpenCV's decode (any depth, 1-4 channels, BGR order) to RGB uint8."""
    img = decoded
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())  # float TIFF/EXR: stretch to 8 bits
        img = ((img - lo) * (255.0 / (hi - lo or 1.0))).astype(np.uint8)
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        # transparent background -> white, like a photo studio backdrop, not black
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        rgb = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB).astype(np.float32)
        return (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def load_image(source: ImageSource) -> np.ndarray:
    """A photo file (path or its bytes) as RGB uint8; AvatarError if it isn't a usable image.

    JPEGs are decoded with their EXIF orientation applied (phone photos are often stored
    sideways); PNG/WebP alpha is composited on white.
    """
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise AvatarError(f"cannot read the image file {source}: {exc.strerror}") from exc
    else:
        data = bytes(source)
    size = image_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise PhotoError(
            f"image too large ({size[0]}x{size[1]}; at most "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels)",
            "too_large",
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    flags = cv2.IMREAD_UNCHANGED if _may_have_alpha(data) else cv2.IMREAD_COLOR
    decoded = cv2.imdecode(buf, flags) if buf.size else None
    if decoded is None or decoded.size == 0:
        raise PhotoError("not an image", "not_image")
    image = _to_rgb8(decoded)
    h, w = image.shape[:2]
    if h < MIN_IMAGE_SIZE or w < MIN_IMAGE_SIZE:
        raise PhotoError(
            f"image too small ({w}x{h}; at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} needed)",
            "too_small",
        )
    return image


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header alone, without decoding the pixels; None if
    the header is not one Pillow knows (the decoder then has the last word)."""
    from PIL import Image  # Pillow comes with matplotlib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return int(img.width), int(img.height)
    except Image.DecompressionBombError as exc:
        raise PhotoError(f"image too large ({exc})", "too_large") from exc
    except Exception:  # noqa: BLE001 - not an image Pillow knows: cv2 decides below
        return None


def _face_frame(face: FaceRig | FaceDetection) -> tuple[float, float, float]:
    """(face centre x, eye line y, face width) in image px."""
    if isinstance(face, FaceRig):
        x0, x1 = float(face.face_box[0]), float(face.face_box[2])
        eye_y = float(face.landmarks[[*LEFT_EYE_CORNERS, *RIGHT_EYE_CORNERS], 1].mean())
    else:
        # The detector's box is about as wide as the landmark box (measured: within 5%).
        x0, x1 = face.box[0], face.box[2]
        eye_y = float(face.keypoints[:2, 1].mean())
    return (x0 + x1) / 2, eye_y, x1 - x0


def crop_to_face(
    image: np.ndarray, face: FaceRig | FaceDetection, size: int = FRAME_SIZE
) -> np.ndarray:
    """The size x size (512) RGB square around the face: face ~45% of the width, centred,
    eyes a bit above the middle. Where the square leaves the photo, edge pixels are repeated
    (a black bar would read as part of the scene to the engines)."""
    cx, eye_y, face_w = _face_frame(face)
    side = max(8, round(face_w / FACE_WIDTH_FRACTION))
    x0 = round(cx - side / 2)
    y0 = round(eye_y - EYE_LINE_FRACTION * side)
    h, w = image.shape[:2]
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x0 + side - w), max(0, y0 + side - h)
    region = image[max(0, y0) : min(h, y0 + side), max(0, x0) : min(w, x0 + side)]
    if region.size == 0:
        raise AvatarError("the face is outside the photo")
    if pad_l or pad_t or pad_r or pad_b:
        region = cv2.copyMakeBorder(region, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(region, (size, size), interpolation=interp))


def reference_image(source: ImageSource | np.ndarray | None = None) -> np.ndarray:
    """The 512x512 reference the engines animate, from a photo (path, bytes or RGB array) or,
    with None, the built-in default. AvatarError with a user-readable reason if the photo has
    no usable face. This is what ``--avatar IMAGE`` and the default avatar go through."""
    if source is None:
        return default_avatar_image()
    image = source if isinstance(source, np.ndarray) else load_image(source)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise AvatarError("expected an RGB image")
    rig = get_rigger().rig(image)
    return crop_to_face(image, rig)


@functools.cache
def _default_avatar() -> np.ndarray:
    from matplotlib import cbook  # matplotlib is heavy to import: only when needed

    # asfileobj=False: the file's path (matplotlib >= 3.8 returns a Path, older a str)
    path = Path(cbook.get_sample_data(DEFAULT_AVATAR_SAMPLE, asfileobj=False))
    image = reference_image(path)
    image.setflags(write=False)
    return image


def default_avatar_image() -> np.ndarray:
    """Grace Hopper's public-domain portrait (matplotlib's sample data), cropped to 512x512."""
    return _default_avatar().copy()
