"""The avatar store: the photos this server can animate, each prepared once by the engine
and shared by every session that picks it; ids from names or from the photo's content."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avatar_stream.avatars.facerig import (
    get_rigger,
)
from avatar_stream.avatars.photo import crop_to_face, load_image
from avatar_stream.avatars.ranking import PhotoScore, photos_in, score_photo
from avatar_stream.engines.base import Avatar, AvatarError, Engine

log = logging.getLogger(__name__)
DEFAULT_ID = "default"
_ID_RE = re.compile(r"[^a-z0-9_-]+")
MAX_ID_LENGTH = 64
#: path segments of the avatar API itself (POST /v1/avatars/rank): never an avatar's id
RESERVED_IDS = frozenset({"rank"})


# --- the store ---------------------------------------------------------------------------------


def avatar_id_for(name: str | None, image: np.ndarray) -> str:
    """An avatar id: the given name made URL-safe, else one derived from the pixels (the same
    photo uploaded twice gets the same id)."""
    if name:
        clean = _ID_RE.sub("-", name.strip().lower()).strip("-")[:MAX_ID_LENGTH]
        if clean in RESERVED_IDS:
            clean += "-avatar"
        if clean:
            return clean
    return "a-" + hashlib.sha256(np.ascontiguousarray(image).data).hexdigest()[:12]


@dataclass
class AvatarRecord:
    """What the store knows about an avatar beyond what the engine made of it."""

    source: str  # file name, "upload" or "built-in"
    content: str  # sha256 of the uploaded/loaded photo's pixels (same photo, same content)
    created: float
    quality: PhotoScore | None = None


def photo_avatar(image: np.ndarray, avatar_id: str, engine_name: str) -> Avatar:
    """A checked 512x512 reference with its face and mouth boxes, and nothing an engine
    derives: what the front of ``--workers`` holds (its workers prepare the engine's part,
    from the disk cache the first of them fills), and the still engine's whole avatar."""
    rig = get_rigger().rig(image)
    return Avatar(avatar_id, image.copy(), rig.face_box, rig.mouth_box,
                  meta={"engine": engine_name})


class AvatarStore:
    """Prepared avatars by id, shared with session creation (``avatars`` is the same dict the
    server looks sessions' avatars up in). Thread-safe: prepare runs on executor threads.

    ``engine`` None: a front process, which loads no engine; its avatars are checked and
    cropped photos (:func:`photo_avatar`) named after ``engine_name``."""

    def __init__(self, engine: Engine | None, avatars: dict[str, Avatar],
                 on_change: Callable[[], None] | None = None, engine_name: str = "") -> None:
        self.engine = engine
        self.engine_name = engine.name if engine is not None else engine_name
        self.avatars = avatars
        self.records: dict[str, AvatarRecord] = {
            key: AvatarRecord("built-in" if key == DEFAULT_ID else "start-up", "", time.time())
            for key in avatars
        }
        self._lock = threading.Lock()
        self._on_change = on_change

    def prepare(self, photo: bytes | Path, name: str | None = None,
                source: str = "upload") -> tuple[Avatar, bool]:
        """Decode, check, crop and prepare a photo; returns (avatar, created). The same photo
        under the same id is returned as it is; another photo under a taken id is refused.
        Heavy (up to ~0.5 s): call it off the event loop."""
        image = load_image(photo)
        rig = get_rigger().rig(image)  # raises PhotoError with the reason
        content = hashlib.sha256(np.ascontiguousarray(image).data).hexdigest()
        avatar_id = avatar_id_for(name, image)
        with self._lock:
            existing = self.records.get(avatar_id)
            if avatar_id in self.avatars and existing is not None:
                if existing.content == content:
                    return self.avatars[avatar_id], False
                raise AvatarConflict(f"avatar id {avatar_id!r} is taken by another photo")
        quality = score_photo(image, source, rig)
        avatar = self.prepare_image(crop_to_face(image, rig), avatar_id)
        avatar.meta = {**avatar.meta, "source": source}
        with self._lock:
            if avatar_id in self.avatars:  # a concurrent upload of the same photo won
                return self.avatars[avatar_id], False
            self.avatars[avatar_id] = avatar
            self.records[avatar_id] = AvatarRecord(source, content, time.time(), quality)
        if self._on_change:
            self._on_change()
        return avatar, True

    def prepare_image(self, image: np.ndarray, avatar_id: str) -> Avatar:
        """A cropped reference as this process's avatar: the engine's, or the photo's only."""
        if self.engine is None:
            return photo_avatar(image, avatar_id, self.engine_name)
        return self.engine.prepare(image, avatar_id)

    def load_folder(self, folder: Path) -> dict[str, str]:
        """Prepare every photo in ``folder`` (id = file name without suffix). Returns the
        photos that were skipped and why; a bad photo never stops the others."""
        skipped = {}
        for path in photos_in(folder):
            try:
                avatar, _ = self.prepare(path, path.stem, source=path.name)
                log.info("avatar %r from %s", avatar.id, path)
            except (AvatarError, AvatarConflict) as exc:
                skipped[path.name] = str(exc)
                log.warning("skipping avatar photo %s: %s", path, exc)
        return skipped

    def remove(self, avatar_id: str) -> bool:
        """Forget an avatar. Sessions already using it keep it until they end."""
        if avatar_id == DEFAULT_ID:
            raise AvatarConflict("the default avatar cannot be deleted")
        with self._lock:
            self.records.pop(avatar_id, None)
            return self.avatars.pop(avatar_id, None) is not None

    def info(self, avatar_id: str) -> dict[str, Any] | None:
        avatar = self.avatars.get(avatar_id)
        if avatar is None:
            return None
        record = self.records.get(avatar_id)
        out = avatar.info()
        if record is not None:
            out["source"] = record.source
            out["created"] = round(record.created, 3)
            if record.quality is not None:
                out["quality"] = {"score": record.quality.score, "notes": record.quality.notes}
        return out

    def list(self) -> list[dict[str, Any]]:
        return [i for key in sorted(self.avatars) if (i := self.info(key)) is not None]

    def preview_png(self, avatar_id: str) -> bytes | None:
        avatar = self.avatars.get(avatar_id)
        if avatar is None:
            return None
        ok, buf = cv2.imencode(".png", cv2.cvtColor(avatar.image, cv2.COLOR_RGB2BGR))
        return buf.tobytes() if ok else None


class AvatarConflict(Exception):
    """The request clashes with the store's state (HTTP 409)."""
