"""The media constants every part shares: one place, so no two modules disagree.

The engines work at 25 fps on 16 kHz speech (frame k is made from samples
``[640k, 640k + 640)``); what goes out, to WebRTC and into rendered files, is 48 kHz audio
(Opus's rate, and what browsers capture) beside 512x512 video.
"""

from __future__ import annotations

FPS = 25
SAMPLE_RATE = 16_000  # the engines' speech
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
FRAME_SIZE = 512
OUT_RATE = 48_000  # audio out (WebRTC, Opus, rendered files) and the test clients' microphone

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
