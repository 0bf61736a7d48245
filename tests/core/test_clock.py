import asyncio

from avatar_stream.core.clock import MediaClock


async def test_deadlines_follow_t0_and_fps() -> None:
    clock = MediaClock(25)
    clock.start()
    assert clock.t0 is not None
    assert abs(clock.deadline(25) - clock.t0 - 1.0) < 1e-9
    assert abs(clock.deadline(0.5) - clock.t0 - 0.02) < 1e-9


async def test_wait_sleeps_until_the_deadline() -> None:
    clock = MediaClock(25)
    clock.start()
    late = await clock.wait(2)  # 80 ms
    loop = asyncio.get_running_loop()
    assert loop.time() >= clock.deadline(2)
    assert late >= 0


async def test_slip_moves_every_later_deadline() -> None:
    clock = MediaClock(25)
    clock.start()
    before = clock.deadline(10)
    clock.slip(0.05)
    assert abs(clock.deadline(10) - before - 0.05) < 1e-9
    assert clock.slipped_s == 0.05
