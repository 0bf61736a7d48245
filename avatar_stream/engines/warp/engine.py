"""The warp engine: prepares a photo into a rig (from the cache when it can) and opens a
stream per session."""

from __future__ import annotations

import numpy as np

from avatar_stream.avatars import facerig as fr
from avatar_stream.engines.base import (
    FRAME_SIZE,
    Avatar,
    AvatarError,
    Engine,
)
from avatar_stream.engines.warp.cache import cached_rig
from avatar_stream.engines.warp.motion import WarpStream
from avatar_stream.engines.warp.rig import WarpRig

# --- engine ------------------------------------------------------------------------------------


class WarpEngine(Engine):
    """The CPU animator. ``prepare`` costs ~0.4 s per new photo (a few ms when its rig is in
    the disk cache); a frame a few milliseconds."""

    name = "warp"
    # a session's steps run one after another, each waiting on the event loop between
    # them: with fewer threads than sessions they also queue behind each other's, which
    # made a tenth of the frames late at 3 sessions on 2 cores (4 threads: a fortieth)
    worker_threads = 4
    shows_states = frozenset({"listening", "thinking"})  # head pose and brows (motion.py)

    def prepare(self, image: np.ndarray, avatar_id: str) -> Avatar:
        """``image`` is normally the 512x512 reference crop (``avatar.reference_image``);
        any other RGB photo is cropped to one first."""
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise AvatarError(f"expected an RGB uint8 image, got {image.shape} {image.dtype}")
        if image.shape[:2] != (FRAME_SIZE, FRAME_SIZE):
            from avatar_stream.avatars.photo import reference_image  # imports the rig's models

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
