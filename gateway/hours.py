"""Business hours per team: a weekly schedule in the team's time zone, plus holidays.

Read from the file ``OMNIGATE_TEAMS_FILE`` (YAML or JSON)::

    default:                 # teams not listed, and handoffs without a team
      timezone: Europe/Berlin
      hours: {mon-fri: "09:00-17:00"}
    teams:
      billing:
        timezone: Europe/Berlin            # an IANA name (zoneinfo)
        hours:
          mon-fri: "09:00-12:30, 13:30-17:00"
          sat: "10:00-14:00"               # days not named are closed
        holidays: ["2025-12-25", "2025-12-26"]
      support: always                      # open around the clock

Without the file (or without ``default``), a team is always open. Times are wall-clock
times in the team's zone, so an opening at 09:00 is 09:00 on both sides of a daylight
saving change; an interval ends at most at 24:00 (split a night shift over two days).

The service-level clock (gateway/sla.py) runs only while the team is open:
``add_open_time(schedule, start, 1 h)`` is the moment one open hour after ``start``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HORIZON_DAYS = 400  # look this far ahead for an opening (holidays cannot close a year)
_RANGE = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")


class HoursError(ValueError):
    """The teams file is invalid; the message names the team and the field."""


@dataclass(frozen=True)
class Schedule:
    """When one team is open. ``week[0]`` is Monday: (start, end) local times, end
    ``None`` meaning midnight at the end of the day."""

    timezone: str
    week: tuple[tuple[tuple[time, time | None], ...], ...]
    holidays: frozenset[date] = frozenset()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def intervals(self, start: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Open intervals (UTC) that end after ``start``, in order, merged when adjacent."""
        zone = self.zone
        day = start.astimezone(zone).date() - timedelta(days=1)
        pending: tuple[datetime, datetime] | None = None
        for _ in range(HORIZON_DAYS):
            if day not in self.holidays:
                for opens, closes in self.week[day.weekday()]:
                    begin = _utc(datetime.combine(day, opens, zone))
                    end = _utc(datetime.combine(day + timedelta(days=1), time(0), zone)
                               if closes is None else datetime.combine(day, closes, zone))
                    if end <= start or end <= begin:
                        continue
                    if pending is not None and begin <= pending[1]:
                        pending = (pending[0], max(end, pending[1]))
                        continue
                    if pending is not None:
                        yield pending
                    pending = (begin, end)
            day += timedelta(days=1)
        if pending is not None:
            yield pending


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class TeamHours:
    """Every team's schedule; None: always open."""

    teams: Mapping[str, Schedule | None] = field(default_factory=dict)
    default: Schedule | None = None

    def for_team(self, team: str | None) -> Schedule | None:
        if team is not None and team in self.teams:
            return self.teams[team]
        return self.default


ALWAYS_OPEN = TeamHours()


def is_open(schedule: Schedule | None, at: datetime) -> bool:
    return next_opening(schedule, at) == at


def next_opening(schedule: Schedule | None, at: datetime) -> datetime | None:
    """``at`` if the team is open then, else when it opens next (None: not within a year)."""
    if schedule is None:
        return at
    for begin, _ in schedule.intervals(at):
        return max(begin, at)
    return None


def add_open_time(schedule: Schedule | None, start: datetime, duration: timedelta) -> datetime:
    """The moment when the team has been open for ``duration`` since ``start``. If it
    never opens again within a year, the wall clock is used."""
    if schedule is None:
        return start + duration
    left = duration
    for opens, end in schedule.intervals(start):
        begin = max(opens, start)
        if end - begin >= left:
            return begin + left
        left -= end - begin
    return start + duration


def opening_text(schedule: Schedule, opening: datetime, now: datetime) -> str:
    """"Monday 09:00 (Europe/Berlin)"; "today 14:00 (...)"; beyond a week, with the date."""
    zone = schedule.zone
    local, today = opening.astimezone(zone), now.astimezone(zone).date()
    days = (local.date() - today).days
    if days == 0:
        when = "today"
    elif days == 1:
        when = "tomorrow"
    elif days < 7:
        when = local.strftime("%A")
    else:
        when = f"{local.strftime('%A')} {local.day} {local.strftime('%B')}"
    return f"{when} {local.strftime('%H:%M')} ({schedule.timezone})"


def closed_notice(schedule: Schedule, opening: datetime | None, now: datetime) -> str:
    """What the customer is told when a handoff finds the team closed."""
    if opening is None:
        return "We're closed now; an agent will answer as soon as we are open again."
    return f"We're closed now; we'll answer from {opening_text(schedule, opening, now)}."


# --------------------------------------------------------------------- parsing


def parse_schedule(where: str, raw: Any) -> Schedule | None:
    """One team's entry: ``always`` or {timezone, hours, holidays}."""
    if raw == "always":
        return None
    if not isinstance(raw, Mapping):
        raise HoursError(f"{where}: expected 'always' or a mapping with timezone, hours, "
                         f"holidays (got {raw!r})")
    unknown = set(raw) - {"timezone", "hours", "holidays"}
    if unknown:
        raise HoursError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         "(expected timezone, hours, holidays)")
    zone = raw.get("timezone")
    if not isinstance(zone, str) or not zone:
        raise HoursError(f"{where}: timezone is required (an IANA name like Europe/Berlin)")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise HoursError(f"{where}: timezone {zone!r} is not an IANA time zone name "
                         "(like Europe/Berlin or America/New_York)") from None
    hours = raw.get("hours")
    if not isinstance(hours, Mapping) or not hours:
        raise HoursError(f"{where}: hours is required, e.g. {{mon-fri: \"09:00-17:00\"}}")
    week: list[list[tuple[time, time | None]]] = [[] for _ in DAYS]
    for days, ranges in hours.items():
        for day in _days(f"{where}: hours", str(days)):
            week[day] += _ranges(f"{where}: hours.{days}", ranges)
    for day, ranges in enumerate(week):
        ranges.sort(key=lambda r: r[0])
        for (_, end), (begin, _) in itertools.pairwise(ranges):
            if end is None or end > begin:
                raise HoursError(f"{where}: hours on {DAYS[day]} overlap")
    if not any(week):
        raise HoursError(f"{where}: hours open on no day; use 'always' or give some hours")
    holidays = raw.get("holidays", [])
    if not isinstance(holidays, list):
        raise HoursError(f"{where}: holidays must be a list of dates like 2025-12-25")
    return Schedule(zone, tuple(tuple(r) for r in week),
                    frozenset(_date(f"{where}: holidays", d) for d in holidays))


def _days(where: str, text: str) -> list[int]:
    found: list[int] = []
    for part in text.replace(" ", "").lower().split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise HoursError(f"{where}: {text!r} is not a day or a range of days "
                             "(mon, tue, wed, thu, fri, sat, sun; e.g. mon-fri)")
        a, b = DAYS.index(first), DAYS.index(last or first)
        if b < a:
            raise HoursError(f"{where}: {text!r} runs backwards (write e.g. mon-fri)")
        found += range(a, b + 1)
    return found


def _ranges(where: str, raw: Any) -> list[tuple[time, time | None]]:
    if raw in ("closed", "", None):
        return []
    if not isinstance(raw, str):
        raise HoursError(f"{where}: expected a string like \"09:00-17:00\" (quote it in YAML)"
                         f", got {raw!r}")
    ranges: list[tuple[time, time | None]] = []
    for part in raw.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise HoursError(f"{where}: {part.strip()!r} is not a range like 09:00-17:00")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            raise HoursError(f"{where}: {part.strip()!r} is not a valid time range")
        opens, closes = time(h1, m1), None if h2 == 24 else time(h2, m2)
        if closes is not None and closes <= opens:
            raise HoursError(f"{where}: {part.strip()!r} ends before it starts (a night "
                             "shift: split it, e.g. mon: \"22:00-24:00\", tue: \"00:00-06:00\")")
        ranges.append((opens, closes))
    return ranges


def _date(where: str, raw: Any) -> date:
    if isinstance(raw, date) and not isinstance(raw, datetime):
        return raw
    try:
        return date.fromisoformat(str(raw))
    except ValueError:
        raise HoursError(f"{where}: {raw!r} is not a date like 2025-12-25") from None


def parse_teams(raw: Any, source: str = "teams") -> TeamHours:
    if raw is None:
        return ALWAYS_OPEN
    if not isinstance(raw, Mapping):
        raise HoursError(f"{source}: expected a mapping with 'teams' and/or 'default'")
    unknown = set(raw) - {"teams", "default"}
    if unknown:
        raise HoursError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         "(expected teams, default)")
    teams = raw.get("teams") or {}
    if not isinstance(teams, Mapping):
        raise HoursError(f"{source}: teams must map team names to their hours")
    default = (parse_schedule(f"{source}: default", raw["default"])
               if raw.get("default") is not None else None)
    return TeamHours({str(name): parse_schedule(f"{source}: team {name!r}", entry)
                      for name, entry in teams.items()}, default)


def load_teams(path: Path) -> TeamHours:
    """Read and validate the teams file (YAML or JSON); HoursError says what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HoursError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise HoursError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                         f": {str(exc).splitlines()[0]}") from None
    return parse_teams(raw, str(path))
