"""The configuration file: documented defaults, overrides, and readable errors for bad files."""

from __future__ import annotations

import pathlib

import pytest

from broker import config
from broker.domain import catalog, model, policy, validation

FULL = """
sizes:
  tiny:  {cpu_request: 100m, cpu_limit: 200m, memory_request: 128Mi, memory_limit: 256Mi, storage: 1Gi}
  huge:  {cpu_request: "8", cpu_limit: "16", memory_request: 32Gi, memory_limit: 64Gi, storage: 1Ti}
versions:
  postgresql: ["15.2", "15.7", "16.4"]
prices: {cpu_core_month: 10, memory_gib_month: 1, storage_gib_month: 0.05}
max_replicas: 3
policies:
  - namespace: team-payments
    resource_type: database
    mode: alert
    ignore_fields: [replicas]
"""


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "broker.yaml"
    path.write_text(text)
    return path


def test_without_a_file_the_documented_defaults_apply() -> None:
    loaded = config.load(None)
    assert loaded.catalog == catalog.DEFAULT_CATALOG
    assert loaded.rules == policy.Policy()


def test_a_file_replaces_sizes_versions_prices_limits_and_policies(tmp_path: pathlib.Path) -> None:
    loaded = config.load(write(tmp_path, FULL))
    assert sorted(loaded.catalog.sizes) == ["huge", "tiny"]
    assert loaded.catalog.resolve_version("postgresql", "15") == "15.7"
    assert loaded.catalog.prices == catalog.Prices(
        cpu_core_month=10, memory_gib_month=1, storage_gib_month=0.05
    )
    rule = loaded.rules.rule_for("team-payments", model.ResourceType.DATABASE)
    assert (rule.mode, rule.ignore_fields) == (policy.Mode.ALERT, frozenset({"replicas"}))
    # The configured catalog is what validation enforces.
    command = validation.provision_command(
        namespace="team-payments",
        resource_type=model.ResourceType.DATABASE,
        resource_name="db",
        spec=model.ResourceSpec(engine="postgresql", version="15", size="tiny", replicas=3),
        callback_url="",
        request_id="",
        catalog=loaded.catalog,
    )
    assert command.spec.resources == loaded.catalog.sizes["tiny"]
    with pytest.raises(Exception, match="between 1 and 3"):
        validation.provision_command(
            namespace="team-payments",
            resource_type=model.ResourceType.DATABASE,
            resource_name="db",
            spec=model.ResourceSpec(engine="postgresql", version="15", size="medium", replicas=4),
            callback_url="",
            request_id="",
            catalog=loaded.catalog,
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: blue\n", "unknown keys colour"),
        ("sizes: {small: {cpu_request: 1}}\n", "sizes.small needs exactly"),
        (
            "sizes: {small: {cpu_request: lots, cpu_limit: 1, memory_request: 1Gi, memory_limit: 1Gi, storage: 1Gi}}\n",
            "sizes.small.cpu_request",
        ),
        ("versions: {oracle: ['19']}\n", "versions.oracle: unknown engine"),
        ("versions: {postgresql: ['fifteen']}\n", "versions.postgresql must be a list of versions"),
        ("prices: {cpu_core_month: 1}\n", "prices needs"),
        ("max_replicas: 0\n", "max_replicas must be a positive integer"),
        ("policies: [{namespace: a, mode: sometimes}]\n", "policies[0]"),
        ("policies: [{namespace: a, ignore_fields: [colour]}]\n", "unknown ignore_fields colour"),
        ("- just\n- a list\n", "must be a mapping"),
        ("sizes: [\n", "cannot read config file"),
    ],
)
def test_a_bad_file_is_a_readable_start_up_error(tmp_path: pathlib.Path, text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is asserted below
        config.load(write(tmp_path, text))
    assert message in str(info.value)
    assert str(tmp_path / "broker.yaml") in str(info.value)
