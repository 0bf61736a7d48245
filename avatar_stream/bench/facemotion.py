"""Measured head and brow motion in a video: what a turn state (listening, thinking) does to
a face, read off the frames by the face rig (MediaPipe's 468 landmarks), engine-free like
``lipsync``, so a rendered clip and the video a client received are graded the same way.

Per frame: the head pose (``FaceRig.yaw_pitch_roll``: degrees, pitch > 0 looks up), the brow
height (brow above the upper eyelid over face height) and the landmarks over face height.
Per stretch of frames (one state): the mean pose and brow, how far the face sits from a
reference stretch's mean shape, and how much it moves from frame to frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from avatar_stream.avatars import facerig as fr

_BROWS = (fr.LEFT_EYEBROW, fr.RIGHT_EYEBROW)
_LIDS = (fr.LEFT_EYE_UPPER, fr.RIGHT_EYE_UPPER)


@dataclass(frozen=True)
class FaceMotion:
    """Per frame (nan where no face was found)."""

    pose: np.ndarray  # (n, 3) yaw, pitch, roll, degrees
    brow: np.ndarray  # (n,) brow height / face height
    shape: np.ndarray  # (n, 468, 2) landmarks in the frame / face height

    def __len__(self) -> int:
        return len(self.brow)

    @property
    def mouth(self) -> np.ndarray:
        """Inner-lip gap / face height per frame, as ``lipsync.mouth_openings`` reads it."""
        gap = self.shape[:, fr.INNER_LIP_TOP] - self.shape[:, fr.INNER_LIP_BOTTOM]
        return np.asarray(np.linalg.norm(gap, axis=1))

    def stats(self, frames: slice | np.ndarray, reference: FaceMotion | None = None,
              ref_frames: slice | np.ndarray | None = None) -> MotionStats:
        """The figures of ``frames``; ``reference`` / ``ref_frames``: the stretch whose mean
        shape the displacement is measured from (default: these frames themselves)."""
        pose, brow, shape = self.pose[frames], self.brow[frames], self.shape[frames]
        ok = np.isfinite(brow)
        pose, brow, shape = pose[ok], brow[ok], shape[ok]
        ref = reference or self
        ref_sel = ref_frames if ref_frames is not None else frames
        ref_shape = ref.shape[ref_sel]
        ref_shape = ref_shape[np.isfinite(ref.brow[ref_sel])]
        if len(brow) < 2 or not len(ref_shape):
            nan = float("nan")
            return MotionStats(0, (nan, nan, nan), (nan, nan, nan), nan, nan, nan)
        mean_ref = ref_shape.mean(axis=0)
        displacement = np.linalg.norm(shape - mean_ref, axis=2).mean(axis=1)
        per_frame = np.linalg.norm(np.diff(shape, axis=0), axis=2).mean(axis=1)
        return MotionStats(
            frames=len(brow),
            pose=tuple(float(v) for v in pose.mean(axis=0)),  # type: ignore[arg-type]
            pose_sd=tuple(float(v) for v in pose.std(axis=0)),  # type: ignore[arg-type]
            brow=float(brow.mean()),
            displacement=float(displacement.mean()),
            motion=float(per_frame.mean()),
        )


@dataclass(frozen=True)
class MotionStats:
    """One stretch of frames, summed up."""

    frames: int  # frames with a face
    pose: tuple[float, float, float]  # mean yaw, pitch, roll, degrees
    pose_sd: tuple[float, float, float]  # their standard deviations (nods, drift)
    brow: float  # mean brow height / face height
    displacement: float  # mean landmark distance from the reference's mean shape, / face h
    motion: float  # mean landmark move from one frame to the next, / face height

    def __str__(self) -> str:
        y, p, r = self.pose
        sy, sp, sr = self.pose_sd
        return (f"yaw {y:+.1f} (sd {sy:.2f}) pitch {p:+.1f} (sd {sp:.2f}) roll {r:+.1f} "
                f"(sd {sr:.2f}) deg, brow {self.brow * 1e3:.1f}, displacement "
                f"{self.displacement * 1e3:.1f}, motion {self.motion * 1e3:.2f} "
                f"(per mille of face height, {self.frames} frames)")


def brow_height(rig: fr.FaceRig) -> float:
    """Mean height of both brows above their upper eyelids, over the face height."""
    points = rig.landmarks
    gaps = [points[lid, 1].min() - points[brow, 1].mean()
            for brow, lid in zip(_BROWS, _LIDS, strict=True)]
    return float(np.mean(gaps)) / rig.face_height


def face_motion(frames: Iterable[np.ndarray]) -> FaceMotion:
    """Pose, brows and shape per RGB uint8 frame, tracking the face as ``lipsync`` does
    (the process-wide rigger on this thread; tracking restarts for every call)."""
    rigger = fr.get_rigger()
    rigger.reset_tracking()
    poses, brows, shapes = [], [], []
    nan_shape = np.full((fr.NUM_LANDMARKS, 2), np.nan)
    for frame in frames:
        points = rigger.track(np.ascontiguousarray(frame))
        if points is None:
            poses.append((np.nan,) * 3)
            brows.append(np.nan)
            shapes.append(nan_shape)
            continue
        rig = fr.make_rig(points, 1.0, frame.shape)
        poses.append(rig.yaw_pitch_roll)
        brows.append(brow_height(rig))
        shapes.append(points[:, :2].astype(np.float64) / rig.face_height)
    rigger.reset_tracking()
    return FaceMotion(np.asarray(poses, np.float64), np.asarray(brows, np.float64),
                      np.asarray(shapes, np.float64))
