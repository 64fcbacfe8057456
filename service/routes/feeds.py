"""Server-sent events of jobs: one database poller per followed job, fanned out to its streams.

However many clients follow a job, one task reads its new events (and, when there are none, its
status) every ``POLL_SECONDS`` and hands them to each stream's queue. A stream first sends what
it missed (its own backlog read, from ``Last-Event-ID``), then what the poller hands it; events
it has already sent are skipped by sequence number, so none is repeated. None is lost either: a
poller starts from its first stream's position, and a later stream subscribes before reading its
backlog, so everything the poller published before lies in what that read sees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.concurrency import run_in_threadpool

from service.store import FINISHED, Store

log = logging.getLogger("autoq.service")

POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0
MAX_SECONDS = 3600.0
PAGE = 500
QUEUE_LIMIT = 10_000
END = None  # put on every queue once the job is finished (or gone) and all its events sent


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    data: dict[str, Any]


def format_event(event: Event) -> str:
    data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n"


@dataclass
class _Feed:
    queues: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None


class Feeds:
    """The pollers of the jobs being followed, keyed by job id."""

    def __init__(self, store: Store, poll_seconds: float = POLL_SECONDS):
        self.store, self.poll_seconds = store, poll_seconds
        self._feeds: dict[str, _Feed] = {}

    def subscribe(self, job_id: str, after: int) -> asyncio.Queue:
        feed = self._feeds.setdefault(job_id, _Feed())
        queue: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT)
        feed.queues.add(queue)
        if feed.task is None:
            feed.task = asyncio.create_task(self._poll(job_id, feed, after))
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        feed = self._feeds.get(job_id)
        if feed is not None:
            feed.queues.discard(queue)

    def pollers(self) -> int:
        return sum(1 for feed in self._feeds.values() if feed.task is not None)

    async def _poll(self, job_id: str, feed: _Feed, cursor: int) -> None:
        # No await between the last check of ``feed.queues`` and the removal of the feed, so a
        # stream cannot join a feed that is going away.
        try:
            status = await run_in_threadpool(self.store.job_status, job_id)
            while feed.queues:
                events = await run_in_threadpool(self.store.events_after, job_id, cursor, PAGE)
                for row in events:
                    self._publish(feed, Event(row.seq, row.kind,
                                              {**row.data, "at": row.created_at}))
                    cursor = row.seq
                if len(events) == PAGE:
                    continue
                if status is None or status in FINISHED:
                    break  # its final status event was written with the status: all sent
                if not events:
                    status = await run_in_threadpool(self.store.job_status, job_id)
                    if status is None or status in FINISHED:
                        continue  # read the events once more, then end
                await asyncio.sleep(self.poll_seconds)
        except Exception:
            log.warning("event feed of %s failed; its streams end", job_id, exc_info=True)
        if self._feeds.get(job_id) is feed:
            del self._feeds[job_id]
        for queue in list(feed.queues):
            self._put(feed, queue, END)

    def _publish(self, feed: _Feed, event: Event) -> None:
        for queue in list(feed.queues):
            self._put(feed, queue, event)

    @staticmethod
    def _put(feed: _Feed, queue: asyncio.Queue, item: Event | None) -> None:
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:  # a stream that does not read: drop it (it may resume)
            feed.queues.discard(queue)
            queue.get_nowait()
            queue.put_nowait(END)


async def event_stream(feeds: Feeds, job_id: str, after: int) -> AsyncIterator[str]:
    """A job's events after ``after``; ends once the job is finished and every event was sent."""
    queue = feeds.subscribe(job_id, after)
    try:
        yield "retry: 2000\n\n"
        while True:  # what the client missed
            rows = await run_in_threadpool(feeds.store.events_after, job_id, after, PAGE)
            for row in rows:
                yield format_event(Event(row.seq, row.kind, {**row.data, "at": row.created_at}))
                after = row.seq
            if len(rows) < PAGE:
                break
        deadline = time.monotonic() + MAX_SECONDS
        while time.monotonic() < deadline:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if item is END:
                return
            if item.seq > after:
                yield format_event(item)
                after = item.seq
    finally:
        feeds.unsubscribe(job_id, queue)
