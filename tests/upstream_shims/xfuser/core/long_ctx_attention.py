"""TEST-ONLY shim of ``xfuser.core.long_ctx_attention`` (used only with sequence parallelism)."""

from __future__ import annotations

from typing import Any


class xFuserLongContextAttention:  # noqa: N801 - upstream's name
    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("xfuser test shim: long-context attention needs the real xfuser")
