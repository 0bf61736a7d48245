"""TEST-ONLY shim of ``xfuser.core.distributed``: a single rank, world size 1."""

from __future__ import annotations

from typing import Any


def get_sequence_parallel_rank() -> int:
    return 0


def get_sequence_parallel_world_size() -> int:
    return 1


def _unavailable(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("xfuser test shim: sequence parallelism needs the real xfuser and GPUs")


get_sp_group = _unavailable
get_world_group = _unavailable
init_distributed_environment = _unavailable
initialize_model_parallel = _unavailable
