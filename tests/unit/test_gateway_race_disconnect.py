"""`_race_disconnect` (ingest/gateway/app.py): the request's work runs in its own task
and stops when the client leaves; a cancellation from outside is never swallowed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ingest.gateway.app import _race_disconnect


def _receive(disconnect: asyncio.Event) -> Any:
    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return receive


def test_work_that_finishes_first_is_not_a_disconnect() -> None:
    async def main() -> tuple[bool, list[str]]:
        done: list[str] = []

        async def work() -> None:
            await asyncio.sleep(0)
            done.append("work")

        return await _race_disconnect(work(), _receive(asyncio.Event())), done

    assert asyncio.run(main()) == (False, ["work"])


def test_a_client_leaving_cancels_the_work_and_says_so() -> None:
    async def main() -> tuple[bool, list[str], bool]:
        seen: list[str] = []
        gone = asyncio.Event()

        async def work() -> None:
            try:
                gone.set()
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        left = await _race_disconnect(work(), _receive(gone))
        await asyncio.sleep(0)  # this task is usable afterwards: no stray cancellation
        task = asyncio.current_task()
        return left, seen, task is not None and task.cancelling() == 0

    assert asyncio.run(main()) == (True, ["cancelled"], True)


def test_a_cancellation_from_outside_propagates_even_as_the_client_leaves() -> None:
    """Guards against swallowing a server shutdown's cancellation as a mere disconnect."""

    async def main() -> None:
        gone = asyncio.Event()

        async def work() -> None:
            await asyncio.sleep(30)

        async def request() -> bool:
            return await _race_disconnect(work(), _receive(gone))

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0)
        gone.set()
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())


def test_an_error_in_the_work_propagates() -> None:
    async def main() -> None:
        async def work() -> None:
            raise ValueError("boom")

        await _race_disconnect(work(), _receive(asyncio.Event()))

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(main())
