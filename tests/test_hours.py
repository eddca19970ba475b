"""Business hours (gateway/hours.py) and the SLA settings: next opening across weekends,
holidays and daylight saving changes, open time added in business hours, clear errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.hours import (
    HoursError,
    add_open_time,
    closed_notice,
    is_open,
    load_teams,
    next_opening,
    parse_schedule,
    parse_teams,
)
from gateway.settings import SettingsError, load_settings
from gateway.sla import DEFAULT_TARGETS, parse_duration, parse_targets

BERLIN = ZoneInfo("Europe/Berlin")
OFFICE = {
    "timezone": "Europe/Berlin",
    "hours": {"mon-fri": "09:00-17:00"},
    "holidays": ["2025-04-18", "2025-12-25"],  # Good Friday, Christmas
}


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)  # type: ignore[misc]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def office():  # type: ignore[no-untyped-def]
    schedule = parse_schedule("office", OFFICE)
    assert schedule is not None
    return schedule


def test_next_opening_across_a_weekend() -> None:
    friday_evening = berlin(2025, 3, 14, 18, 0)
    opening = next_opening(office(), friday_evening)
    assert opening == utc(2025, 3, 17, 8, 0)  # Monday 09:00 CET
    assert closed_notice(office(), opening, friday_evening) == (
        "We're closed now; we'll answer from Monday 09:00 (Europe/Berlin).")


def test_open_now_is_now_and_closing_time_is_closed() -> None:
    now = berlin(2025, 3, 12, 10, 30)
    assert is_open(office(), now)
    assert next_opening(office(), now) == now
    assert not is_open(office(), berlin(2025, 3, 12, 17, 0))  # 17:00 is closed
    assert is_open(office(), berlin(2025, 3, 12, 16, 59))
    assert next_opening(office(), berlin(2025, 3, 12, 7, 0)) == utc(2025, 3, 12, 8, 0)
    assert closed_notice(office(), utc(2025, 3, 12, 8, 0), berlin(2025, 3, 12, 7, 0)) == (
        "We're closed now; we'll answer from today 09:00 (Europe/Berlin).")
    assert closed_notice(office(), utc(2025, 3, 13, 8, 0), berlin(2025, 3, 12, 18, 0)) == (
        "We're closed now; we'll answer from tomorrow 09:00 (Europe/Berlin).")


def test_next_opening_skips_a_holiday() -> None:
    # Thursday before Good Friday, after closing: Friday is a holiday, then the weekend
    opening = next_opening(office(), berlin(2025, 4, 17, 17, 30))
    assert opening == utc(2025, 4, 21, 7, 0)  # Monday 09:00 CEST
    # during the holiday itself
    assert not is_open(office(), berlin(2025, 4, 18, 10, 0))


def test_a_long_closure_names_the_date() -> None:
    raw = {**OFFICE, "holidays": [f"2025-12-{d}" for d in range(22, 32)] + ["2026-01-01"]}
    schedule = parse_schedule("office", raw)
    assert schedule is not None
    now = berlin(2025, 12, 19, 18, 0)
    opening = next_opening(schedule, now)
    assert opening == utc(2026, 1, 2, 8, 0)
    assert closed_notice(schedule, opening, now) == (
        "We're closed now; we'll answer from Friday 2 January 09:00 (Europe/Berlin).")


def test_daylight_saving_starts_end_of_march() -> None:
    # Berlin: Sunday 2025-03-30 02:00 CET -> 03:00 CEST. Friday after closing (CET, UTC+1)
    # to Monday 09:00 CEST (UTC+2): 09:00 wall clock, 07:00 UTC.
    friday = berlin(2025, 3, 28, 18, 0)
    assert friday.utcoffset() == timedelta(hours=1)
    opening = next_opening(office(), friday)
    assert opening == utc(2025, 3, 31, 7, 0)
    assert opening is not None and opening.astimezone(BERLIN).hour == 9
    assert closed_notice(office(), opening, friday) == (
        "We're closed now; we'll answer from Monday 09:00 (Europe/Berlin).")
    # open time is real time: the Sunday of the change has 23 hours
    sundays = parse_schedule("sundays", {"timezone": "Europe/Berlin",
                                         "hours": {"sun": "00:00-24:00"}})
    start = berlin(2025, 3, 30, 0, 0)
    assert add_open_time(sundays, start, timedelta(hours=23)) == utc(2025, 3, 30, 22, 0)
    # the 24th hour is the first hour of the next Sunday
    assert add_open_time(sundays, start, timedelta(hours=24)) == berlin(2025, 4, 6, 1, 0)


def test_daylight_saving_ends_end_of_october() -> None:
    # Berlin: Sunday 2025-10-26 03:00 CEST -> 02:00 CET (a 25-hour day)
    saturday = berlin(2025, 10, 25, 18, 0)
    assert saturday.utcoffset() == timedelta(hours=2)
    opening = next_opening(office(), saturday)
    assert opening == utc(2025, 10, 27, 8, 0)  # Monday 09:00 CET
    sundays = parse_schedule("sundays", {"timezone": "Europe/Berlin",
                                         "hours": {"sun": "00:00-24:00"}})
    assert add_open_time(sundays, berlin(2025, 10, 26, 0, 0), timedelta(hours=25)) == (
        utc(2025, 10, 26, 23, 0))  # midnight CET: the whole 25-hour day was open


def test_open_time_runs_only_inside_hours() -> None:
    friday = berlin(2025, 3, 14, 16, 30)
    # 1 open hour from Friday 16:30: 30 minutes on Friday, 30 on Monday
    assert add_open_time(office(), friday, timedelta(hours=1)) == berlin(2025, 3, 17, 9, 30)
    # 24 open hours from Monday 09:00: three 8-hour days -> Wednesday 17:00
    monday = berlin(2025, 3, 17, 9, 0)
    assert add_open_time(office(), monday, timedelta(hours=24)) == berlin(2025, 3, 19, 17, 0)
    # handed off at night: the clock starts at opening
    night = berlin(2025, 3, 17, 3, 0)
    assert add_open_time(office(), night, timedelta(minutes=5)) == berlin(2025, 3, 17, 9, 5)


def test_a_team_without_hours_is_always_open() -> None:
    teams = parse_teams({"teams": {"billing": OFFICE, "support": "always"}})
    now = berlin(2025, 3, 15, 3, 0)  # Saturday night
    for team in ("support", "nobody-listed", None):
        schedule = teams.for_team(team)
        assert schedule is None
        assert is_open(schedule, now)
        assert add_open_time(schedule, now, timedelta(hours=1)) == now + timedelta(hours=1)
    assert not is_open(teams.for_team("billing"), now)
    # a default applies to teams not listed and to handoffs without a team
    with_default = parse_teams({"default": OFFICE, "teams": {"support": "always"}})
    assert not is_open(with_default.for_team(None), now)
    assert not is_open(with_default.for_team("sales"), now)
    assert is_open(with_default.for_team("support"), now)


def test_split_hours_and_adjacent_days() -> None:
    schedule = parse_schedule("t", {"timezone": "UTC", "hours": {
        "mon": "09:00-12:00, 13:00-17:00", "tue": "22:00-24:00", "wed": "00:00-06:00"}})
    assert next_opening(schedule, utc(2025, 3, 17, 12, 30)) == utc(2025, 3, 17, 13, 0)
    # a night shift split over two days counts as one stretch
    start = utc(2025, 3, 18, 23, 0)
    assert add_open_time(schedule, start, timedelta(hours=3)) == utc(2025, 3, 19, 2, 0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"timezone": "Europe/Berln", "hours": {"mon": "09:00-17:00"}},
         "timezone 'Europe/Berln' is not an IANA time zone name"),
        ({"hours": {"mon": "09:00-17:00"}}, "timezone is required"),
        ({"timezone": "UTC", "hours": {"monday": "09:00-17:00"}}, "'monday' is not a day"),
        ({"timezone": "UTC", "hours": {"fri-mon": "09:00-17:00"}}, "runs backwards"),
        ({"timezone": "UTC", "hours": {"mon": "9-17"}}, "'9-17' is not a range like"),
        ({"timezone": "UTC", "hours": {"mon": "17:00-09:00"}}, "ends before it starts"),
        ({"timezone": "UTC", "hours": {"mon": "25:00-26:00"}}, "not a valid time range"),
        ({"timezone": "UTC", "hours": {"mon": "09:00-12:00, 11:00-13:00"}}, "overlap"),
        ({"timezone": "UTC", "hours": {"mon": "closed"}}, "open on no day"),
        ({"timezone": "UTC", "hours": {"mon": 540}}, "quote it in YAML"),
        ({"timezone": "UTC", "hours": {"mon": "09:00-17:00"}, "holidays": ["xmas"]},
         "'xmas' is not a date"),
        ({"timezone": "UTC", "hours": {"mon": "09:00-17:00"}, "open": True},
         "unknown key(s) open"),
    ],
)
def test_schedule_errors_say_what_is_wrong(raw: dict[str, object], message: str) -> None:
    with pytest.raises(HoursError) as caught:
        parse_schedule("team 'billing'", raw)
    assert message in str(caught.value)
    assert str(caught.value).startswith("team 'billing': ")


def test_teams_file_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "teams.yaml"
    yaml_file.write_text(
        "default:\n  timezone: Europe/Berlin\n  hours: {mon-fri: \"09:00-17:00\"}\n"
        "teams:\n  night:\n    timezone: America/New_York\n"
        "    hours: {sat-sun: \"10:00-14:00\"}\n    holidays: [2025-12-25]\n"
        "  support: always\n")
    teams = load_teams(yaml_file)
    night = teams.for_team("night")
    assert night is not None and night.timezone == "America/New_York"
    assert teams.for_team("support") is None
    json_file = tmp_path / "teams.json"
    json_file.write_text('{"teams": {"a": {"timezone": "UTC", "hours": {"mon": "08:00-09:00"}}}}')
    assert load_teams(json_file).for_team("a") is not None
    broken = tmp_path / "broken.yaml"
    broken.write_text("teams: [\n")
    with pytest.raises(HoursError, match="not valid YAML"):
        load_teams(broken)
    with pytest.raises(HoursError, match="cannot read it"):
        load_teams(tmp_path / "missing.yaml")


def test_targets_setting() -> None:
    assert parse_targets("") == dict(DEFAULT_TARGETS)
    targets = parse_targets("urgent=2m/1h, low=1d/5d")
    assert targets["urgent"].first_response == timedelta(minutes=2)
    assert targets["low"].resolution == timedelta(days=5)
    assert targets["normal"] == DEFAULT_TARGETS["normal"]  # not named: the default
    assert parse_duration("1h30m") == timedelta(minutes=90)
    for bad, message in [
        ("critical=5m/1h", "priority one of urgent, high, normal, low"),
        ("urgent=5m", "give both targets"),
        ("urgent=5x/1h", "'5x' is not a duration"),
        ("urgent=0m/1h", "longer than zero"),
        ("urgent=2h/1h", "resolution target is shorter"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_targets(bad)


def test_settings_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIGATE_SLA_TARGETS", "urgent=5m/4h, critical=1m/1h")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "OMNIGATE_SLA_TARGETS: " in str(caught.value)
    assert "'critical=1m/1h'" in str(caught.value)
    monkeypatch.delenv("OMNIGATE_SLA_TARGETS")

    teams = tmp_path / "teams.yaml"
    teams.write_text("teams:\n  billing:\n    timezone: Mars/Olympus\n"
                     "    hours: {mon-fri: \"09:00-17:00\"}\n")
    monkeypatch.setenv("OMNIGATE_TEAMS_FILE", str(teams))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    text = str(caught.value)
    assert "OMNIGATE_TEAMS_FILE: " in text
    assert "team 'billing': timezone 'Mars/Olympus' is not an IANA time zone name" in text

    teams.write_text("teams:\n  billing:\n    timezone: Europe/Berlin\n"
                     "    hours: {mon-fri: \"09:00-17:00\"}\n")
    settings = load_settings()
    assert settings.team_hours().for_team("billing") is not None
    assert settings.sla_target_map() == dict(DEFAULT_TARGETS)
