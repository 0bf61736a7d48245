"""The aiortc and aioice internals this package relies on, checked once at start-up.

aiortc offers no public setting for five things the server needs, so these places set a
private attribute, call or wrap a private method, or replace a module function (each one
says why):

- ``encoders.replace_encoder``: a sender's encoder (``RTCRtpSender.__encoder``);
- ``encoders.prefer_h264``: a transceiver's negotiated codecs (``RTCRtpTransceiver._codecs``);
- ``jitterbuffer.replace``: a receiver's jitter buffer (``RTCRtpReceiver.__jitter_buffer``);
- ``feedback.VideoFeedback``: sees a sender's RTCP first (``RTCRtpSender._handle_rtcp_packet``)
  and asks it for keyframes (``_send_keyframe``);
- ``ice.restrict_host_addresses``: the host addresses aioice gathers
  (``aioice.ice.get_host_addresses``).

pyproject pins aiortc and aioice to the versions these were verified on. A version outside
them that drops one of the internals would not fail, it would silently misbehave (the
avatar's encoders never used, candidates on every interface); ``check`` turns that into a
clear error at start-up that names the version.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from types import FunctionType

import aioice.ice
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver

TESTED = "aiortc>=1.15,<1.17 and aioice>=0.10,<0.14"

#: (class, attribute its methods assign) for each private attribute set from outside
PRIVATE_ATTRIBUTES = (
    (RTCRtpSender, "_RTCRtpSender__encoder"),
    (RTCRtpReceiver, "_RTCRtpReceiver__jitter_buffer"),
    (RTCRtpTransceiver, "_codecs"),
)
#: (class, private method called or wrapped from outside)
PRIVATE_METHODS = (
    (RTCRtpSender, "_handle_rtcp_packet"),
    (RTCRtpSender, "_send_keyframe"),
)


class AiortcMismatch(RuntimeError):
    """The installed aiortc or aioice lacks an internal this package relies on."""


def _assigned_by(cls: type, attribute: str) -> bool:
    """Whether one of ``cls``'s own methods sets ``self.<attribute>`` (read off their code,
    so nothing has to be constructed)."""
    for value in vars(cls).values():
        code = getattr(value, "__code__", None) if isinstance(value, FunctionType) else None
        if code is not None and attribute in code.co_names:
            return True
    return False


def missing() -> list[str]:
    """The internals the installed versions lack (empty: all there)."""
    gone = [f"{cls.__name__}.{attr}" for cls, attr in PRIVATE_ATTRIBUTES
            if not _assigned_by(cls, attr)]
    gone += [f"{cls.__name__}.{name}" for cls, name in PRIVATE_METHODS
             if not callable(getattr(cls, name, None))]
    if not callable(getattr(aioice.ice, "get_host_addresses", None)):
        gone.append("aioice.ice.get_host_addresses")
    return gone


@functools.cache
def check() -> None:
    """Raise AiortcMismatch naming the versions when an internal is missing."""
    gone = missing()
    if gone:
        raise AiortcMismatch(
            f"aiortc {version('aiortc')} / aioice {version('aioice')} lack what avatar-stream "
            f"relies on ({', '.join(gone)}); install the tested versions: {TESTED}")
