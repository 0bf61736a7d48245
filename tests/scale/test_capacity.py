"""Admission figures and the cores a process may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avatar_stream.scale import capacity


@pytest.mark.parametrize("cpu_max, expected", [
    ("max 100000", None),  # no quota: the CPU set
    ("200000 100000", 2),
    ("150000 100000", 2),  # 1.5 cores: two threads can use them
    ("50000 100000", 1),
    ("garbage", None),
])
def test_cores_follow_the_cpu_set_and_the_containers_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, expected: int | None
) -> None:
    cpu_set = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a big host
    f = tmp_path / "cpu.max"
    f.write_text(cpu_max + "\n")
    monkeypatch.setattr(capacity, "CGROUP_CPU_MAX", f)
    assert capacity.cores() == (64 if expected is None else expected)
    monkeypatch.setattr(capacity, "CGROUP_CPU_MAX", tmp_path / "absent")
    assert capacity.cores() == 64
    monkeypatch.undo()
    assert 1 <= capacity.cores() <= cpu_set
