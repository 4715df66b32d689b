"""AsyncEngine's handoff from the engine thread to the event loop, without a server."""

import asyncio

from server_fakes import FakeEngine

from leanlm.engine.outputs import RequestOutput
from leanlm.server.async_engine import AsyncEngine, Submission, _Route


def test_one_step_wakes_the_event_loop_once_for_all_submissions():
    async def scenario():
        engine = AsyncEngine(FakeEngine(), max_in_flight=8)
        loop = engine._loop = asyncio.get_running_loop()
        submissions = [Submission(engine, f"s{i}", 2) for i in range(3)]
        for submission in submissions:
            for index in range(2):
                engine._routes[submission.request_id(index)] = _Route(submission, index)
        wake_ups = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda callback, *args: wake_ups.append(callback) or original(callback, *args)
        outputs = [
            RequestOutput(0, None, [1], request_id=s.request_id(i), new_token_ids=[7], new_text="x")
            for s in submissions
            for i in range(2)
        ]
        engine._dispatch(outputs, now=1.0)
        assert len(wake_ups) == 1
        await asyncio.sleep(0)  # let the callback run
        return [[submission._queue.get_nowait()[0] for _ in range(2)] for submission in submissions]

    assert asyncio.run(scenario()) == [[0, 1]] * 3
