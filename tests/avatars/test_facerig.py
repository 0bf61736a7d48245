"""Face detection and landmarks with the real MediaPipe models on real and derived photos."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib import cbook

from avatar_stream.avatars import facerig
from avatar_stream.avatars.facerig import FaceDetection, FaceRig, FaceRigger, get_rigger
from avatar_stream.engines.base import AvatarError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own rig cache, so nothing leaks into ~/.cache or between tests."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(facerig.CACHE_DIR_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """Grace Hopper, 512x600, one frontal face ~190 px wide (public domain, in matplotlib)."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        data = np.frombuffer(f.read(), np.uint8)
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def rigger() -> FaceRigger:
    return get_rigger()


@pytest.fixture(scope="module")
def base_rig(rigger: FaceRigger, portrait: np.ndarray) -> FaceRig:
    return rigger.rig(portrait, use_cache=False)


def _rotate(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE), m


def _open_mouth(image: np.ndarray, rig: FaceRig, gap: float) -> np.ndarray:
    """Drop the jaw by ``gap`` px and darken the opening: a crude but real-looking open mouth."""
    pts = rig.landmarks
    lip_y = float(pts[13, 1] + pts[14, 1]) / 2
    cx = float(pts[61, 0] + pts[291, 0]) / 2
    half = float(pts[291, 0] - pts[61, 0]) / 2
    chin = float(pts[152, 1])
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    across = np.clip(1 - (np.abs(xx - cx) / (half * 1.6)) ** 2, 0, 1)
    down = np.clip((yy - lip_y) / gap, 0, 1) * np.clip((chin + 2 * gap - yy) / (2 * gap), 0, 1)
    out = cv2.remap(image, xx, yy - gap * across * down, cv2.INTER_LINEAR)
    mask = np.zeros((h, w), np.uint8)
    centre = (round(cx), round(lip_y + gap / 2))
    cv2.ellipse(mask, centre, (round(half * 0.85), round(gap / 2)), 0, 0, 360, 255, -1)
    inside = mask > 0
    out[inside] = (out[inside] * 0.15 + np.array([60, 20, 25]) * 0.85).astype(np.uint8)
    return out


def _timed(fn, n: int = 30) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def test_model_files_found_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = facerig.find_model_dir()
    assert all((folder / name).is_file() for name in facerig.MODEL_FILES)
    monkeypatch.setenv(facerig.MODEL_DIR_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="make install"):
        facerig.find_model_dir()
    for name in facerig.MODEL_FILES:
        (tmp_path / name).symlink_to(folder / name)
    assert facerig.find_model_dir() == tmp_path


def test_anchor_counts_match_models() -> None:
    assert facerig.ssd_anchors(facerig.SHORT_RANGE).shape == (896, 2)
    assert facerig.ssd_anchors(facerig.FULL_RANGE).shape == (2304, 2)


def test_detect_one_face(rigger: FaceRigger, portrait: np.ndarray) -> None:
    faces = rigger.detect(portrait)
    assert len(faces) == 1
    face = faces[0]
    assert isinstance(face, FaceDetection)
    assert face.score > 0.8
    x0, y0, x1, y1 = face.box
    assert 0 <= x0 < x1 <= portrait.shape[1] and 0 <= y0 < y1 <= portrait.shape[0]
    assert 150 < x1 - x0 < 260
    kp = face.keypoints
    assert kp.shape == (6, 2)
    assert kp[0, 0] < kp[1, 0]  # eye at image left, then image right
    assert kp[0, 1] < kp[2, 1] < kp[3, 1]  # eyes above the nose above the mouth
    assert x0 < kp[2, 0] < x1


def test_rig_landmarks_sit_on_the_face(base_rig: FaceRig, portrait: np.ndarray) -> None:
    rig = base_rig
    pts = rig.landmarks
    assert pts.shape == (468, 3) and pts.dtype == np.float32
    assert rig.score > 0.9
    fx0, fy0, fx1, fy1 = rig.face_box
    mx0, my0, mx1, my1 = rig.mouth_box
    assert 150 < fx1 - fx0 < 260
    assert fx0 <= mx0 < mx1 <= fx1 and fy0 <= my0 < my1 <= fy1  # mouth inside the face
    eyes_y = pts[[*facerig.LEFT_EYE, *facerig.RIGHT_EYE], 1]
    assert eyes_y.max() < my0  # mouth box below the eyes
    assert pts[facerig.LEFT_EYE, 0].mean() < pts[facerig.RIGHT_EYE, 0].mean()
    assert pts[10, 1] < pts[1, 1] < pts[13, 1] < pts[14, 1] < pts[152, 1]  # brow..chin order
    assert pts[61, 0] < pts[13, 0] < pts[291, 0]
    lips = pts[facerig.LIPS_OUTER, :2]
    assert (lips >= [mx0, my0]).all() and (lips <= [mx1, my1]).all()
    # The mouth is closed and the eyes open in this photo.
    assert rig.mouth_opening < 0.03
    left, right = rig.eye_openness
    assert 0.12 < left < 0.5 and 0.12 < right < 0.5
    yaw, pitch, roll = rig.yaw_pitch_roll
    assert abs(yaw) < 15 and abs(pitch) < 20 and abs(roll) < 10


def test_tilted_face_follows_rotation(
    rigger: FaceRigger, portrait: np.ndarray, base_rig: FaceRig
) -> None:
    """Rotate the photo 10 degrees: the landmarks rotate with it (the crop is levelled)."""
    tilted, m = _rotate(portrait, 10)
    rig = rigger.rig(tilted, use_cache=False)
    expected = base_rig.landmarks[:, :2] @ m[:, :2].T + m[:, 2]
    err = np.linalg.norm(rig.landmarks[:, :2] - expected, axis=1)
    print(f"tilt 10 deg: mean landmark error {err.mean():.2f} px, max {err.max():.2f} px")
    assert err.mean() < 2.5
    # getRotationMatrix2D turns counter-clockwise on screen: roll decreases by ~10.
    roll_change = rig.yaw_pitch_roll[2] - base_rig.yaw_pitch_roll[2]
    assert -13 < roll_change < -7


def test_scaled_photos_give_scaled_landmarks(
    rigger: FaceRigger, portrait: np.ndarray, base_rig: FaceRig
) -> None:
    for scale in (0.6, 2.0, 3.5):  # 3.5: the big-face path that area-downsamples the crop
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        image = cv2.resize(portrait, None, fx=scale, fy=scale, interpolation=interp)
        rig = rigger.rig(image, use_cache=False)
        err = np.linalg.norm(rig.landmarks[:, :2] / scale - base_rig.landmarks[:, :2], axis=1)
        print(f"scale {scale}: mean error {err.mean():.2f} px (original scale)")
        assert err.mean() < 2.0


def test_mirrored_photo_mirrors_pose(
    rigger: FaceRigger, portrait: np.ndarray, base_rig: FaceRig
) -> None:
    mirrored = np.ascontiguousarray(portrait[:, ::-1])
    rig = rigger.rig(mirrored, use_cache=False)
    w = portrait.shape[1]
    for i in (facerig.NOSE_TIP, facerig.INNER_LIP_TOP, facerig.CHIN, facerig.FOREHEAD_TOP):
        x, y = base_rig.landmarks[i, :2]
        assert np.allclose(rig.landmarks[i, :2], (w - x, y), atol=5)
    # the face outline is the least symmetric part of the model's output
    x0, y0, x1, y1 = base_rig.face_box
    assert np.allclose(rig.face_box, (w - x1, y0, w - x0, y1), atol=12)
    # roll flips sign; yaw moves the other way (the model is not exactly symmetric)
    assert np.sign(rig.yaw_pitch_roll[2]) == -np.sign(base_rig.yaw_pitch_roll[2])
    assert rig.yaw_pitch_roll[0] < base_rig.yaw_pitch_roll[0]


def test_no_face(rigger: FaceRigger) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    blank = np.full((400, 400, 3), 200, np.uint8)
    for image in (noise, blank):
        assert rigger.detect(image) == []
    # Smooth colour blobs: a quarter of such images fool a detector (score 0.5-0.65 here;
    # real faces 0.8-0.95), never the landmark model, so rig() finds no face.
    blobs = cv2.resize(
        np.random.default_rng(5).integers(0, 256, (6, 8, 3), dtype=np.uint8),
        (640, 480),
        interpolation=cv2.INTER_CUBIC,
    )
    assert len(rigger.detect(blobs)) == 1
    for image in (noise, blank, blobs):
        with pytest.raises(AvatarError, match="^no face found in the photo$"):
            rigger.rig(image)
        assert rigger.mouth_opening(image) is None


def test_far_faces_use_the_full_range_model(rigger: FaceRigger, portrait: np.ndarray) -> None:
    """Faces 1/12 of the photo's side: beyond the short-range model's reach (at best it
    returns a loose box with a low score), the full-range model's box wins."""
    for side, (y, x) in ((2400, (600, 500)), (2800, (733, 572))):
        canvas = np.full((side, side, 3), (120, 130, 140), np.uint8)
        canvas[y : y + 600, x : x + 512] = portrait
        faces = rigger.detect(canvas)
        assert len(faces) == 1
        x0, y0, x1, y1 = faces[0].box
        assert x < x0 < x1 < x + 512 and y < y0 < y1 < y + 600
        assert 150 < x1 - x0 < 240
        rig = rigger.rig(canvas, use_cache=False)
        assert rig.score > 0.9 and 150 < rig.face_box[2] - rig.face_box[0] < 260


def test_three_faces_stacked(rigger: FaceRigger, portrait: np.ndarray) -> None:
    """A tall strip of three portraits (faces 1/9 of its height): both models see them."""
    strip = np.concatenate([portrait] * 3, axis=0)
    assert len(rigger.detect(strip)) == 3
    with pytest.raises(AvatarError, match="^3 faces found in the photo"):
        rigger.rig(strip)


def test_two_faces(rigger: FaceRigger, portrait: np.ndarray) -> None:
    pair = np.concatenate([portrait, portrait], axis=1)
    assert len(rigger.detect(pair)) == 2
    with pytest.raises(AvatarError, match="^2 faces found in the photo; use a photo with one"):
        rigger.rig(pair)


def test_face_too_small(rigger: FaceRigger, portrait: np.ndarray) -> None:
    small = cv2.resize(portrait, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)
    # on a bigger canvas too, so it is the face and not the photo that is small
    canvas = cv2.copyMakeBorder(small, 200, 200, 200, 200, cv2.BORDER_REPLICATE)
    for image in (small, canvas):
        with pytest.raises(AvatarError, match=r"^the face is too small \((\d+) px wide") as e:
            rigger.rig(image)
        width = int(str(e.value).split("(")[1].split()[0])
        assert 40 < width < 80
        assert str(e.value).endswith("at least 80 px needed)")


def test_rejects_non_rgb(rigger: FaceRigger, portrait: np.ndarray) -> None:
    with pytest.raises(ValueError):
        rigger.detect(portrait[:, :, 0])
    with pytest.raises(ValueError):
        rigger.detect(portrait.astype(np.float32))


def test_landmarks_from_a_plain_box(
    rigger: FaceRigger, portrait: np.ndarray, base_rig: FaceRig
) -> None:
    rig = rigger.landmarks(portrait, rigger.detect(portrait)[0].box)
    err = np.linalg.norm(rig.landmarks[:, :2] - base_rig.landmarks[:, :2], axis=1)
    assert rig.score > 0.9 and err.mean() < 1.5
    nothing = rigger.landmarks(np.zeros_like(portrait), (100, 100, 300, 300))
    assert nothing.score < facerig.PRESENCE_THRESHOLD


def test_rig_cache(
    rigger: FaceRigger, portrait: np.ndarray, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    path = facerig.rig_cache_path(portrait)
    assert path.parent == _private_cache / "rigs" and path.suffix == ".npz"
    assert not path.exists()
    first = rigger.rig(portrait)
    assert path.is_file()

    def no_models(*args, **kwargs):
        raise AssertionError("the cached rig should not run the models")

    monkeypatch.setattr(rigger, "detect", no_models)
    monkeypatch.setattr(rigger, "landmarks", no_models)
    t = time.perf_counter()
    second = rigger.rig(portrait)
    print(f"cached rig: {(time.perf_counter() - t) * 1000:.2f} ms")
    assert np.array_equal(first.landmarks, second.landmarks)
    assert first.face_box == second.face_box and first.mouth_box == second.mouth_box
    # different pixels, different key
    other = portrait.copy()
    other[0, 0] ^= 1
    assert facerig.rig_cache_path(other) != path
    # a torn file is ignored, recomputed and rewritten
    monkeypatch.undo()
    monkeypatch.setenv(facerig.CACHE_DIR_ENV, str(_private_cache))
    path.write_bytes(b"garbage")
    third = rigger.rig(portrait)
    assert np.allclose(third.landmarks, first.landmarks)
    with np.load(path) as saved:
        assert saved["landmarks"].shape == (468, 3)


def test_rig_cache_unwritable_is_not_fatal(
    rigger: FaceRigger, portrait: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(facerig.CACHE_DIR_ENV, str(blocker))
    assert rigger.rig(portrait).score > 0.9


def test_mouth_opening_tracks_an_opening_mouth(
    rigger: FaceRigger, portrait: np.ndarray, base_rig: FaceRig
) -> None:
    rigger.reset_tracking()
    values = []
    for gap in (0, 6, 12, 20, 30):
        frame = _open_mouth(portrait, base_rig, gap) if gap else portrait
        values.append(rigger.mouth_opening(frame))
    print("mouth opening by jaw drop 0/6/12/20/30 px:", [round(v, 3) for v in values])
    assert all(v is not None for v in values)
    assert values[0] < 0.02 and values[-1] > 0.07
    assert (np.diff(values) > 0).all()
    # the tracked fast path agrees with a full rig of the same frame
    full = rigger.rig(_open_mouth(portrait, base_rig, 20), use_cache=False)
    assert abs(full.mouth_opening - values[3]) < 0.02
    # face gone: None, and the face coming back is found again
    assert rigger.mouth_opening(np.zeros_like(portrait)) is None
    assert rigger.mouth_opening(portrait) == pytest.approx(values[0], abs=0.01)


def test_threads_share_a_rigger(rigger: FaceRigger, portrait: np.ndarray) -> None:
    expected = rigger.rig(portrait, use_cache=False).landmarks
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                results.append(rigger.rig(portrait, use_cache=False).landmarks)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 30
    for r in results:
        assert np.allclose(r, expected, atol=1e-3)


def test_timings(rigger: FaceRigger, portrait: np.ndarray) -> None:
    """Report per-call costs (not asserted tightly: the machine is shared)."""
    face = rigger.detect(portrait)[0]
    frame = cv2.resize(portrait, (512, 512))
    rigger.reset_tracking()
    timings = {
        "detect": _timed(lambda: rigger.detect(portrait)),
        "landmarks (1 pass)": _timed(lambda: rigger.landmarks(portrait, face, refine=False)),
        "landmarks (2 passes)": _timed(lambda: rigger.landmarks(portrait, face)),
        "mouth_opening (tracked)": _timed(lambda: rigger.mouth_opening(frame)),
        "rig (no cache)": _timed(lambda: rigger.rig(portrait, use_cache=False)),
    }
    print("; ".join(f"{k}: {v:.2f} ms" for k, v in timings.items()))
    assert timings["landmarks (1 pass)"] < 50
