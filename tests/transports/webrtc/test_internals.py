"""The start-up check of the aiortc internals the server relies on."""

from __future__ import annotations

import pytest

from avatar_stream.transports.webrtc import internals as aiortc_internals
from avatar_stream.transports.webrtc.internals import AiortcMismatch


def test_the_installed_aiortc_has_every_internal_used() -> None:
    assert aiortc_internals.missing() == []
    aiortc_internals.check()


def test_a_missing_internal_is_named_with_the_versions(monkeypatch) -> None:
    from aiortc.rtcrtpsender import RTCRtpSender

    class Changed(RTCRtpSender):  # as if a release had renamed the encoder attribute
        pass

    monkeypatch.setattr(aiortc_internals, "PRIVATE_ATTRIBUTES",
                        ((Changed, "_RTCRtpSender__encoder"),))
    monkeypatch.delattr(aiortc_internals.aioice.ice, "get_host_addresses")
    aiortc_internals.check.cache_clear()
    try:
        with pytest.raises(AiortcMismatch, match=r"aiortc 1\.\d+.*Changed\._RTCRtpSender__encoder"
                           r".*get_host_addresses.*aiortc>=1\.15,<1\.17"):
            aiortc_internals.check()
    finally:
        aiortc_internals.check.cache_clear()
