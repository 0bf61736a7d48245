"""Shared test fixtures: offline speech (espeak-ng) and a real server on loopback."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

SPEECH_TEXT = (
    "Hello there. I am a talking head, animated from a single photo. "
    "Every word you hear comes back in sync with my lips."
)


def espeak(text: str, path: Path, rate: int = 48000) -> np.ndarray:
    """Speak ``text`` offline into a mono 16-bit wav at ``rate``; returns the samples."""
    if not shutil.which("espeak-ng") or not shutil.which("sox"):
        pytest.fail("espeak-ng and sox are needed (make test installs them)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path)],
                   check=True)
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).copy()


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def speech48k(speech_dir: Path) -> np.ndarray:
    return espeak(SPEECH_TEXT, speech_dir / "speech48k.wav")


@pytest.fixture(scope="session")
def speech_wav(speech_dir: Path, speech48k: np.ndarray) -> Path:
    return speech_dir / "speech48k.wav"
