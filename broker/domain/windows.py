"""Maintenance windows: when automatic remediation may run.

A window opens at every time a five-field cron expression names, read in an IANA time zone, and
stays open for a duration. Outside every window the detector defers automatic remediation
(a RemediationDeferred event) and carries it out when the next window opens, unless the drift
resolved itself meanwhile. Approved remediations are not held back: a person's approval is the
decision to act now.

The arithmetic is pure (the caller passes ``now``), so it is tested without waiting for clocks.
Cron expressions are read by croniter; time zones by zoneinfo. Daylight-saving gaps and repeats
are croniter's business: a window opens at the wall-clock times it names in the zone.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import zoneinfo

import croniter

# The longest window: a week covers every weekly schedule, and a longer one is surely a typo.
MAX_DURATION = datetime.timedelta(days=7)
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


@dataclasses.dataclass(frozen=True)
class Window:
    """A maintenance window: opens at ``cron`` in ``time_zone``, open for ``duration``."""

    cron: str
    duration: datetime.timedelta
    time_zone: str = "UTC"

    def describe(self) -> str:
        """How people write it: ``"0 2 * * *" for 2h (Europe/Berlin)``."""
        return f'"{self.cron}" for {format_duration(self.duration)} ({self.time_zone})'

    def _zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.time_zone)

    def current_or_next(self, now: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
        """The window open at ``now`` (its start is then not after ``now``), else the next one.

        Both times are in UTC.
        """
        local = now.astimezone(self._zone())
        # The latest opening at or before now: an opening exactly at ``now`` counts as started.
        latest = croniter.croniter(self.cron, local + datetime.timedelta(seconds=1)).get_prev(
            datetime.datetime
        )
        if latest <= local < latest + self.duration:
            start = latest
        else:
            start = croniter.croniter(self.cron, local).get_next(datetime.datetime)
        start_utc = start.astimezone(datetime.UTC)
        return start_utc, start_utc + self.duration

    def is_open(self, now: datetime.datetime) -> bool:
        """Whether a window is open at ``now``."""
        start, end = self.current_or_next(now)
        return start <= now < end

    def opens_in(self, now: datetime.datetime) -> datetime.timedelta:
        """How long until a window is open (zero while one is)."""
        start, _ = self.current_or_next(now)
        return max(datetime.timedelta(0), start - now)


def parse_duration(text: str) -> datetime.timedelta:
    """``"90m"``, ``"2h"``, ``"1h30m"``, ``"1d"``, ``"45s"``: a positive duration of at most a week."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise ValueError(
            f"{text[:40]!r} is not a duration: write a number with a unit, such as 30m, 2h, 1h30m or 1d"
        )
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    try:
        value = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:
        value = MAX_DURATION + datetime.timedelta(seconds=1)  # far past the longest: refused below
    if value <= datetime.timedelta(0):
        raise ValueError("the duration must be longer than zero")
    if value > MAX_DURATION:
        raise ValueError(f"the duration {text.strip()} is longer than the longest window, 7 days")
    return value


def format_duration(value: datetime.timedelta) -> str:
    """The shortest spelling ``parse_duration`` reads back (``5400 s`` is ``1h30m``)."""
    total = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    return "".join(parts) or "0s"


def parse(*, cron: str, duration: str, time_zone: str) -> Window:
    """A window from what a person wrote; ValueError naming the part that is wrong and how to fix it.

    The error's first word is the part: ``cron``, ``duration`` or ``time_zone``.
    """
    cron = " ".join(cron.split())
    if len(cron.split(" ")) != 5 or not croniter.croniter.is_valid(cron):
        raise WindowError(
            "cron",
            f"{cron[:80]!r} is not a five-field cron expression (minute hour day-of-month month "
            "day-of-week), for example '0 2 * * *' for 02:00 every day",
        )
    try:
        length = parse_duration(duration)
    except ValueError as e:
        raise WindowError("duration", str(e)) from e
    zone = time_zone.strip() or "UTC"
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as e:  # OSError: "Europe", a directory
        raise WindowError(
            "time_zone",
            f"{zone[:60]!r} is not an IANA time zone; use a name such as 'UTC' or 'Europe/Berlin'",
        ) from e
    window = Window(cron=cron, duration=length, time_zone=zone)
    try:
        window.current_or_next(datetime.datetime.now(datetime.UTC))
    except (croniter.CroniterError, ValueError) as e:  # valid fields that never fire: 30 February
        raise WindowError(
            "cron", f"{cron[:80]!r} never fires (no such date); write one that does, such as '0 2 * * *'"
        ) from e
    return window


class WindowError(ValueError):
    """A maintenance window that cannot be read: ``part`` is ``cron``, ``duration`` or ``time_zone``."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part
