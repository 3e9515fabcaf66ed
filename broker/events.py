"""Fan-out of committed drift events to live subscribers (the WatchDrift streams).

The event log is the source of truth: one tailer per process (``EventHub.tail``) reads
``events_after(position)`` and offers what it read to every subscription, in sequence order. A
commit only *wakes* the tailer (``EventHub.notify``, called by the store after it committed, outside
its write transaction); the tailer also looks on its own every ``poll_interval`` seconds, so a
wake-up that never comes (another replica's commit, a lost notification) costs latency, never an
event. Subscribers' filters never run inside a store transaction.

Offering never waits: each subscription has a bounded buffer, and one that is full is cut off
(``overflowed``) instead of growing memory or slowing the others; its stream then ends with a
resumable error and the client resumes from its last sequence.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

from broker import workers
from broker.domain import model

log = logging.getLogger(__name__)

Predicate = Callable[[model.DriftEvent], bool]
# Reads the log: up to ``limit`` events after a sequence, in order (``EventLog.events_after``).
Source = Callable[[int, int], Awaitable[list[model.DriftEvent]]]


class Subscription:
    """One subscriber's bounded buffer of matching events, and the position it may resume from.

    ``position`` only moves past what the stream handed on: events leave the buffer through
    ``next``, and the position moves to the newest sequence offered (filtered-out events
    included) only while nothing is buffered, so a heartbeat never carries the sequence of an
    event the subscriber has not been given yet.
    """

    __slots__ = (
        "_buffer",
        "_high_water",
        "_hub",
        "_limit",
        "_ready",
        "closed",
        "on_end",
        "overflowed",
        "predicate",
    )

    def __init__(
        self, hub: EventHub, predicate: Predicate, limit: int, on_end: Callable[[], None] | None = None
    ) -> None:
        self._hub = hub
        # Called when the subscription ends (cut off, shutdown): a transport blocked on a write that
        # will never complete learns from it that the stream is over.
        self.on_end = on_end
        self.predicate = predicate
        self._limit = limit
        self._buffer: collections.deque[model.DriftEvent] = collections.deque()
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False
        self._high_water = 0

    def offer(self, event: model.DriftEvent) -> None:
        """Buffer ``event`` if it matches; cut the subscriber off when its buffer is full."""
        if self.closed:
            return
        self._high_water = max(self._high_water, event.sequence)
        if not self.predicate(event):
            return
        if len(self._buffer) >= self._limit:
            self.overflowed = True
            self.close()
            return
        self._buffer.append(event)
        self._ready.set()

    def close(self) -> None:
        """End the subscription; a waiting ``next`` returns None."""
        self.closed = True
        self._buffer.clear()
        self._ready.set()
        if self.on_end is not None:
            self.on_end()
        self._hub.unsubscribe(self)

    def idle_position(self) -> int | None:
        """The newest sequence offered, when nothing is buffered; None while events wait.

        With an empty buffer every matching event up to here was handed on and the rest were
        filtered out, so a stream may tell its client to resume from here.
        """
        return None if self._buffer else self._high_water

    async def next(self, within: float) -> model.DriftEvent | None:
        """The next buffered event; None when closed or when ``within`` seconds pass with none.

        A buffered event always wins over the timeout: the timer may fire in the same event-loop
        step as an event is buffered, and that event must not wait for (or be skipped by) the
        heartbeat that follows.
        """
        if not self._buffer and not self.closed:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._ready.wait()
        if self._buffer and not self.closed:
            return self._buffer.popleft()
        return None


class EventHub:
    """The set of live subscriptions; ``publish`` delivers to each without blocking.

    ``tail`` is the worker that feeds it from the log; without it (unit tests) events are
    published directly.
    """

    def __init__(self, *, poll_interval: float = 1.0, page: int = 500) -> None:
        self._subscriptions: set[Subscription] = set()
        self.shutting_down = False
        self.poll_interval = poll_interval
        self._page = page
        self._wake = workers.Wakeup()
        # The newest sequence offered to the subscriptions.
        self.position = 0
        self.observers: list[Callable[[list[model.DriftEvent]], None]] = []
        """Called with every page the tailer reads, every replica's events (must not block): the
        leader's detector learns of approvals made on other replicas this way."""

    def notify(self, events: list[model.DriftEvent] | None = None) -> None:
        """New events were committed: the tailer reads the log at once (a store listener)."""
        self._wake.set()

    async def tail(self, source: Source, *, start: int, _iterations: int | None = None) -> None:
        """Read the log after ``start`` for ever, offering each page to the subscriptions.

        A subscription taken before a stream reads the log's bounds gets every event the tailer
        reads later, so a stream that replays up to those bounds and then takes live events
        above them misses nothing.
        """
        self.position = max(self.position, start)

        async def step() -> float | None:
            page = await source(self.position, self._page)
            if page:
                self.position = page[-1].sequence
                self.publish(page)
            # A full page: more is waiting, read on at once.
            return 0.0 if len(page) >= self._page else None

        await workers.run_forever(step, interval=self.poll_interval, wake=self._wake, _iterations=_iterations)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def subscribe(
        self, predicate: Predicate, *, limit: int, on_end: Callable[[], None] | None = None
    ) -> Subscription:
        """A new subscription that receives every later matching event; ``on_end`` when it ends."""
        subscription = Subscription(self, predicate, limit, on_end)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a subscription (closing it is the subscriber's business)."""
        self._subscriptions.discard(subscription)

    def publish(self, events: list[model.DriftEvent]) -> None:
        """Deliver committed events, in sequence order, to every subscription."""
        for subscription in list(self._subscriptions):
            for event in events:
                subscription.offer(event)
        for observer in self.observers:
            observer(events)

    def close_all(self) -> None:
        """Shutdown: end every subscription; their streams end resumably."""
        self.shutting_down = True
        for subscription in list(self._subscriptions):
            subscription.close()
