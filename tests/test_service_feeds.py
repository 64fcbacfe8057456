"""Event streams: one poller per followed job however many clients follow it, and each stream
gets every event after its position exactly once, in order, then ends with the job."""

from __future__ import annotations

import asyncio
import threading

from service.routes.feeds import Feeds, event_stream
from service.store import SUCCEEDED, Store


def test_streams_share_one_poller_and_miss_nothing(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_all()
    job, _ = store.create_job(model="m", model_path="m", request={}, request_hash="h",
                              idempotency_key=None)
    store.claim(job.id, "w1")  # events 1 (queued) and 2 (running)
    feeds = Feeds(store, poll_seconds=0.02)
    pollers: list[int] = []

    def work() -> None:
        for step in range(40):
            store.report(job.id, "w1", "stage", stage=f"stage{step}", progress=step / 40,
                         message=None)
        store.finish(job.id, "w1", SUCCEEDED, message="done")

    async def follow(after: int) -> list[int]:
        ids = []
        async for chunk in event_stream(feeds, job.id, after):
            if chunk.startswith("id: "):
                ids.append(int(chunk.split("\n", 1)[0][4:]))
                pollers.append(feeds.pollers())
        return ids

    async def main() -> list[list[int]]:
        streams = [asyncio.create_task(follow(after)) for after in (0, 0, 1, 2, 2, 5, 0, 30)]
        await asyncio.sleep(0.1)
        writer = threading.Thread(target=work)
        writer.start()
        results = await asyncio.gather(*streams)
        writer.join()
        late = await follow(40)  # after the end: the rest, then done
        return [*results, late]

    results = asyncio.run(main())
    last = store.get_job(job.id).event_seq
    assert last == 43
    for after, ids in zip((0, 0, 1, 2, 2, 5, 0, 30, 40), results, strict=True):
        assert ids == list(range(after + 1, last + 1)), (after, ids)
    assert set(pollers) == {1}  # eight streams, one poller
    assert feeds.pollers() == 0
