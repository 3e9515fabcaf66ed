"""Maintenance-window arithmetic and input checks (``broker.domain.windows``), and what the policy
makes of mode approve: pure code, with the time passed in."""

from __future__ import annotations

import datetime

import pytest

from broker.domain import model, policy, rules, windows

UTC = datetime.UTC


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


NIGHTLY_BERLIN = windows.parse(cron="0 2 * * *", duration="2h", time_zone="Europe/Berlin")


@pytest.mark.parametrize(
    ("now", "open_", "start", "end"),
    [
        # 02:00 in Berlin is 01:00 UTC in winter.
        ("2026-01-10T00:59:59+00:00", False, "2026-01-10T01:00:00+00:00", "2026-01-10T03:00:00+00:00"),
        ("2026-01-10T01:00:00+00:00", True, "2026-01-10T01:00:00+00:00", "2026-01-10T03:00:00+00:00"),
        ("2026-01-10T02:59:59+00:00", True, "2026-01-10T01:00:00+00:00", "2026-01-10T03:00:00+00:00"),
        ("2026-01-10T03:00:00+00:00", False, "2026-01-11T01:00:00+00:00", "2026-01-11T03:00:00+00:00"),
        # and 00:00 UTC in summer.
        ("2026-07-10T00:30:00+00:00", True, "2026-07-10T00:00:00+00:00", "2026-07-10T02:00:00+00:00"),
    ],
)
def test_a_window_is_open_from_its_cron_time_for_its_duration_in_its_zone(
    now: str, open_: bool, start: str, end: str
) -> None:
    assert NIGHTLY_BERLIN.is_open(at(now)) is open_
    assert NIGHTLY_BERLIN.current_or_next(at(now)) == (at(start), at(end))
    expected_wait = datetime.timedelta(0) if open_ else at(start) - at(now)
    assert NIGHTLY_BERLIN.opens_in(at(now)) == expected_wait


def test_weekday_windows_skip_the_weekend() -> None:
    weekdays = windows.parse(cron="30 22 * * 1-5", duration="30m", time_zone="UTC")
    # Friday 23:00 is past Friday's window: the next is Monday's.
    assert weekdays.current_or_next(at("2026-01-09T23:00:00+00:00"))[0] == at("2026-01-12T22:30:00+00:00")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("1d", 86400), ("45s", 45)]
)
def test_durations_read_back_as_written(text: str, seconds: int) -> None:
    value = windows.parse_duration(text)
    assert value.total_seconds() == seconds
    assert windows.parse_duration(windows.format_duration(value)) == value


@pytest.mark.parametrize(
    ("cron", "duration", "zone", "part", "hint"),
    [
        ("0 2 * *", "2h", "", "cron", "five-field"),
        ("61 2 * * *", "2h", "", "cron", "five-field"),
        ("0 2 * * * *", "2h", "", "cron", "five-field"),
        ("0 2 * * *", "2 hours", "", "duration", "30m, 2h"),
        ("0 2 * * *", "0m", "", "duration", "longer than zero"),
        ("0 2 * * *", "8d", "", "duration", "7 days"),
        ("0 2 * * *", "2h", "Mars/Olympus", "time_zone", "IANA"),
        ("0 2 * * *", "2h", "../../etc/passwd", "time_zone", "IANA"),
        ("0 2 * * *", "2h", "Europe", "time_zone", "IANA"),  # a directory of zones, not one
        ("0 2 * * *", "2h", "A" * 300, "time_zone", "IANA"),
        ("0 2 * * *", "9999999999999d", "", "duration", "7 days"),  # past what a timedelta holds
        ("0 0 30 2 *", "2h", "", "cron", "never fires"),  # 30 February
    ],
)
def test_bad_windows_name_the_part_and_how_to_write_it(
    cron: str, duration: str, zone: str, part: str, hint: str
) -> None:
    with pytest.raises(windows.WindowError) as bad:
        windows.parse(cron=cron, duration=duration, time_zone=zone)
    assert bad.value.part == part
    assert hint in str(bad.value)


def test_no_zone_is_utc() -> None:
    assert windows.parse(cron="0 2 * * *", duration="1h", time_zone="").time_zone == "UTC"


def test_mode_approve_turns_auto_remediation_into_approval_and_leaves_alerts_alone() -> None:
    scaled = rules.item("replicas.changed", "replicas", 1, 3, message="Replica count mismatch")
    resized = rules.item("size.changed", "size", "small", "large", message="Size mismatch")
    rule = policy.Rule(namespace="team-platform", mode=policy.Mode.APPROVE)
    items = policy.Policy(rules=(rule,)).apply(
        "team-platform", model.ResourceType.DATABASE, [scaled, resized]
    )
    assert [i.action for i in items] == [model.Action.APPROVAL_REQUIRED, model.Action.ALERT_ONLY]
    # Other namespaces keep the default table.
    other = policy.Policy(rules=(rule,)).apply("team-other", model.ResourceType.DATABASE, [scaled])
    assert [i.action for i in other] == [model.Action.AUTO_REMEDIATE]


def test_the_config_file_takes_mode_approve_and_maintenance_windows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from broker import config

    path = tmp_path / "broker.yaml"
    path.write_text(
        "policies:\n"
        "  - namespace: team-orders\n    mode: approve\n"
        "  - namespace: team-search\n    maintenance_window: {cron: '0 2 * * 1-5', duration: 2h, "
        "time_zone: Europe/Berlin}\n"
    )
    rules_ = config.load(path).rules.rules
    assert [r.mode for r in rules_] == [policy.Mode.APPROVE, policy.Mode.AUTO]
    assert rules_[1].window == windows.parse(cron="0 2 * * 1-5", duration="2h", time_zone="Europe/Berlin")
    path.write_text(
        "policies:\n  - namespace: x\n    maintenance_window: {cron: '0 2 * * *', duration: forever}\n"
    )
    with pytest.raises(ValueError, match=r"maintenance_window\.duration"):
        config.load(path)


def test_a_drift_rule_may_have_a_mode_of_its_own() -> None:
    scaled = rules.item("replicas.changed", "replicas", 1, 3, message="Replica count mismatch")
    labelled = rules.item("config.changed", "config", "a", "b", message="Env changed")
    resized = rules.item("size.changed", "size", "small", "large", message="Size mismatch")
    rule = policy.Rule(
        namespace="team-platform",
        mode=policy.Mode.AUTO,
        rule_modes=(("replicas.changed", policy.Mode.APPROVE), ("size.changed", policy.Mode.OFF)),
    )
    items = policy.Policy(rules=(rule,)).apply(
        "team-platform", model.ResourceType.DATABASE, [scaled, labelled, resized]
    )
    # replicas: approval; labels: the policy's auto; size: not reported at all.
    assert [(i.rule_id, i.action) for i in items] == [
        ("replicas.changed", model.Action.APPROVAL_REQUIRED),
        ("config.changed", model.Action.AUTO_REMEDIATE),
    ]
    # A policy that is off everywhere but for one rule reports that rule only.
    only = policy.Rule(
        namespace="team-platform", mode=policy.Mode.OFF, rule_modes=(("replicas.changed", policy.Mode.ALERT),)
    )
    items = policy.Policy(rules=(only,)).apply(
        "team-platform", model.ResourceType.DATABASE, [scaled, labelled]
    )
    assert [(i.rule_id, i.action) for i in items] == [("replicas.changed", model.Action.ALERT_ONLY)]


def test_the_config_file_takes_rule_modes_and_refuses_unknown_rules(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from broker import config

    path = tmp_path / "broker.yaml"
    path.write_text("policies:\n  - namespace: team-billing\n    rule_modes: {replicas.changed: approve}\n")
    (rule,) = config.load(path).rules.rules
    assert rule.rule_modes == (("replicas.changed", policy.Mode.APPROVE),)
    path.write_text("policies:\n  - namespace: x\n    rule_modes: {replicas.moved: approve}\n")
    with pytest.raises(ValueError, match=r"unknown drift rule replicas\.moved"):
        config.load(path)
    path.write_text("policies:\n  - namespace: x\n    rule_modes: {replicas.changed: sometimes}\n")
    with pytest.raises(ValueError, match=r"rule_modes\.replicas\.changed"):
        config.load(path)
