"""Reference photos: decoding, checks with user-readable errors, and the 512x512 face crop."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib import cbook

from avatar_stream.avatars import facerig
from avatar_stream.avatars import photo as avatar
from avatar_stream.avatars.facerig import FaceRig, get_rigger
from avatar_stream.engines.base import AvatarError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(facerig.CACHE_DIR_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return f.read()


@pytest.fixture(scope="module")
def portrait(jpeg_bytes: bytes) -> np.ndarray:
    return avatar.load_image(jpeg_bytes)


def _encode(image_rgb_or_gray: np.ndarray, ext: str = ".png") -> bytes:
    img = image_rgb_or_gray
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _check_framing(image: np.ndarray) -> FaceRig:
    """The crop contract: 512x512 RGB, face ~45% wide, centred, eyes a bit above the middle."""
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    rig = get_rigger().rig(image, use_cache=False)
    x0, _, x1, _ = rig.face_box
    assert 0.38 < (x1 - x0) / 512 < 0.52
    assert abs((x0 + x1) / 2 - 256) < 15
    eye_y = rig.landmarks[[33, 133, 263, 362], 1].mean()
    assert 0.34 * 512 < eye_y < 0.5 * 512
    return rig


def test_load_image_from_path_and_bytes(tmp_path: Path, jpeg_bytes: bytes) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes)
    from_path = avatar.load_image(path)
    from_str = avatar.load_image(str(path))
    from_bytes = avatar.load_image(jpeg_bytes)
    assert from_path.shape == (600, 512, 3) and from_path.dtype == np.uint8
    assert np.array_equal(from_path, from_bytes) and np.array_equal(from_path, from_str)
    # RGB order: the background top right is blue sky
    r, g, b = from_path[20:60, 450:500].reshape(-1, 3).mean(axis=0)
    assert b > r + 30


def test_load_image_grayscale_alpha_and_16_bit(portrait: np.ndarray) -> None:
    gray = cv2.cvtColor(portrait, cv2.COLOR_RGB2GRAY)
    loaded = avatar.load_image(_encode(gray))
    assert loaded.shape == (600, 512, 3)
    assert np.array_equal(loaded[:, :, 0], gray) and np.array_equal(loaded[:, :, 2], gray)

    rgba = np.dstack([portrait, np.full(portrait.shape[:2], 255, np.uint8)])
    rgba[:100, :100, 3] = 0  # a transparent corner becomes white
    loaded = avatar.load_image(_encode(rgba))
    assert loaded.shape == (600, 512, 3)
    assert (loaded[:100, :100] == 255).all()
    assert np.array_equal(loaded[200:, 200:], portrait[200:, 200:])

    deep = portrait.astype(np.uint16) * 257
    loaded = avatar.load_image(_encode(deep))
    assert np.array_equal(loaded, portrait)


def test_load_image_applies_exif_orientation() -> None:
    """Phones store photos sideways with an EXIF Orientation tag; we must show them upright."""
    stored = np.zeros((200, 300, 3), np.uint8)
    stored[:50, :, 2] = 255  # red band along the stored top (BGR)
    jpeg = _encode(stored[:, :, ::-1].copy(), ".jpg")
    # a minimal Exif APP1 segment: one IFD entry, Orientation (0x0112) = 6 (rotate 90 cw)
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0)
    payload = b"Exif\x00\x00" + tiff + struct.pack(">I", 0)
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    upright = avatar.load_image(jpeg[:2] + app1 + jpeg[2:])
    assert upright.shape == (300, 200, 3)
    assert upright[:, -30:, 0].mean() > 200 and upright[:, :100, 0].mean() < 30  # band on the right


def test_load_image_errors(tmp_path: Path) -> None:
    for junk in (b"", b"not an image at all", b"\x89PNG\r\n\x1a\n truncated", b"\xff\xd8\xff"):
        with pytest.raises(AvatarError, match="^not an image$"):
            avatar.load_image(junk)
    with pytest.raises(AvatarError, match=r"^image too small \(100x50; at least 128x128 needed\)$"):
        avatar.load_image(_encode(np.zeros((50, 100, 3), np.uint8)))
    with pytest.raises(AvatarError, match="cannot read the image file"):
        avatar.load_image(tmp_path / "missing.jpg")


def test_crop_to_face_framing(portrait: np.ndarray) -> None:
    rig = get_rigger().rig(portrait)
    _check_framing(avatar.crop_to_face(portrait, rig))


def test_crop_from_a_detection_matches_the_rig_crop(portrait: np.ndarray) -> None:
    detection = get_rigger().detect(portrait)[0]
    from_detection = _check_framing(avatar.crop_to_face(portrait, detection))
    from_rig = get_rigger().rig(avatar.crop_to_face(portrait, get_rigger().rig(portrait)))
    assert abs(from_detection.face_box[0] - from_rig.face_box[0]) < 20


def test_crop_pads_with_edge_pixels(portrait: np.ndarray) -> None:
    """A face near the photo's corner: the square leaves the photo, edges are repeated."""
    corner = np.ascontiguousarray(portrait[100:460, 120:])  # face near the left and top edges
    rig = get_rigger().rig(corner)
    crop = avatar.crop_to_face(corner, rig)
    _check_framing(crop)
    # no black bars: every border row/column is a copy of a photo edge, not zeros
    assert crop[:, :8].mean() > 20 and crop[:8].mean() > 20
    # the left band repeats one column of the photo: constant along x
    assert np.abs(np.diff(crop[:, :5].astype(int), axis=1)).max() <= 2


def test_big_photo_is_area_downscaled(portrait: np.ndarray) -> None:
    big = cv2.resize(portrait, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    rig = get_rigger().rig(big)
    _check_framing(avatar.crop_to_face(big, rig))


def test_default_avatar_image() -> None:
    image = avatar.default_avatar_image()
    rig = _check_framing(image)
    assert rig.score > 0.9
    image[:] = 0  # callers get a copy: the shared default is not spoiled
    assert avatar.default_avatar_image().any()


def test_reference_image(tmp_path: Path, jpeg_bytes: bytes, portrait: np.ndarray) -> None:
    path = tmp_path / "me.jpg"
    path.write_bytes(jpeg_bytes)
    from_path = avatar.reference_image(path)
    _check_framing(from_path)
    assert np.array_equal(from_path, avatar.reference_image(jpeg_bytes))
    assert np.array_equal(from_path, avatar.reference_image(portrait))
    assert np.array_equal(avatar.reference_image(None), avatar.default_avatar_image())
    assert np.array_equal(from_path, avatar.default_avatar_image())


def test_reference_image_rejects_bad_photos(portrait: np.ndarray) -> None:
    cases = {
        b"hello": "^not an image$",
        _encode(np.full((300, 300, 3), 128, np.uint8)): "^no face found in the photo$",
        _encode(np.concatenate([portrait, portrait], axis=1)): "^2 faces found in the photo",
        _encode(
            cv2.copyMakeBorder(
                cv2.resize(portrait, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA),
                150, 150, 150, 150, cv2.BORDER_REPLICATE,
            )
        ): r"^the face is too small \(\d+ px wide; at least 80 px needed\)$",
    }  # fmt: skip
    for data, message in cases.items():
        with pytest.raises(AvatarError, match=message):
            avatar.reference_image(data)
