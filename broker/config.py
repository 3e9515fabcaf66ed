"""The configuration file (``broker serve --config FILE``): sizes, versions, prices and policies.

Everything is optional; what is left out keeps the documented defaults of ``broker.domain.catalog``.

.. code-block:: yaml

    sizes:                      # replaces the size tiers when given
      small:  {cpu_request: 250m, cpu_limit: 500m, memory_request: 512Mi, memory_limit: 1Gi, storage: 5Gi}
      medium: {cpu_request: 500m, cpu_limit: "1", memory_request: 1Gi, memory_limit: 2Gi, storage: 20Gi}
    versions:                   # concrete versions per engine; a floating "15" resolves to the newest 15.x
      postgresql: ["14.11", "15.2", "16.2"]
    prices:                     # per month, in one currency
      cpu_core_month: 56.0
      memory_gib_month: 9.5
      storage_gib_month: 0.40
    max_replicas: 9
    heartbeat_interval: 5       # any setting of `broker serve`, by its flag in snake case
    callback_max_backoff: 30
    policies:                   # DESIGN section 5; the most specific rule wins
      - namespace: "*"
        mode: auto
      - namespace: team-payments
        resource_type: database
        mode: alert
        ignore_fields: [replicas]
      - namespace: team-orders
        mode: approve           # a person approves each remediation (broker approve ID)
      - namespace: team-billing
        mode: auto
        rule_modes:             # a drift rule with a mode of its own (rule ids: the README's table)
          replicas.changed: approve
      - namespace: team-search
        mode: auto
        maintenance_window:     # automatic remediation only 02:00-04:00 Berlin time on weekdays
          cron: "0 2 * * 1-5"
          duration: 2h
          time_zone: Europe/Berlin
    budgets:                    # monthly cost budget per namespace, in the prices' currency
      team-platform: 500        # SetCostBudget overrides it (and removing that brings it back)

A file that does not follow this shape is a start-up error that names the offending key.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import yaml

from broker import errors, settings
from broker.domain import catalog as catalog_mod
from broker.domain import costs, drift, model, policy, quantity, validation, windows
from broker.domain import rules as drift_rules


@dataclasses.dataclass(frozen=True)
class Config:
    """What the file configures."""

    catalog: catalog_mod.Catalog
    rules: policy.Policy
    # Values of ``broker.settings.TABLE`` by config key (``heartbeat_interval: 5``), unparsed:
    # the settings table parses them, after the flags and the environment had their say.
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Monthly cost budgets by namespace (``broker.domain.costs``).
    budgets: dict[str, float] = dataclasses.field(default_factory=dict)


def load(path: pathlib.Path | None) -> Config:
    """The configuration of ``path`` on top of the defaults; the defaults alone when None."""
    if path is None:
        return Config(catalog=catalog_mod.DEFAULT_CATALOG, rules=policy.Policy())
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read config file {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must be a mapping")
    catalog_keys = {"sizes", "versions", "prices", "max_replicas", "policies", "budgets"}
    unknown = set(raw) - catalog_keys - settings.BY_KEY.keys()
    if unknown:
        raise ValueError(
            f"config file {path}: unknown keys {', '.join(sorted(unknown))} (besides sizes, versions, "
            "prices, max_replicas, policies and budgets, a key is a setting of `broker serve --help` "
            "in snake case)"
        )
    where = f"config file {path}"
    return Config(
        catalog=_catalog(raw, where),
        rules=_policies(raw.get("policies") or [], where),
        budgets=_budgets(raw.get("budgets") or {}, where),
        settings={k: v for k, v in raw.items() if k not in catalog_keys},
    )


def _catalog(raw: dict[str, Any], where: str) -> catalog_mod.Catalog:
    base = catalog_mod.DEFAULT_CATALOG
    sizes = base.sizes
    if "sizes" in raw:
        sizes = {}
        for name, figures in _mapping(raw["sizes"], f"{where}: sizes").items():
            fields = {f.name for f in dataclasses.fields(model.ComputeResources)}
            if not isinstance(figures, dict) or set(figures) != fields:
                raise ValueError(f"{where}: sizes.{name} needs exactly {', '.join(sorted(fields))}")
            for key, value in figures.items():
                try:
                    quantity.parse(str(value))
                except ValueError as e:
                    raise ValueError(f"{where}: sizes.{name}.{key}: {e}") from e
            sizes[str(name)] = model.ComputeResources(**{k: str(v) for k, v in figures.items()})
    engines = dict(base.engines)
    for engine, versions in _mapping(raw.get("versions", {}), f"{where}: versions").items():
        if engine not in engines:
            raise ValueError(
                f"{where}: versions.{engine}: unknown engine (known: {', '.join(sorted(engines))})"
            )
        if not isinstance(versions, list) or not all(catalog_mod.is_valid_version(str(v)) for v in versions):
            raise ValueError(f"{where}: versions.{engine} must be a list of versions like '15.2'")
        engines[engine] = dataclasses.replace(engines[engine], versions=tuple(str(v) for v in versions))
    prices = base.prices
    if "prices" in raw:
        figures = _mapping(raw["prices"], f"{where}: prices")
        try:
            prices = catalog_mod.Prices(**{k: float(v) for k, v in figures.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{where}: prices needs cpu_core_month, memory_gib_month, storage_gib_month ({e})"
            ) from e
    max_replicas = raw.get("max_replicas", base.max_replicas)
    if not isinstance(max_replicas, int) or max_replicas < 1:
        raise ValueError(f"{where}: max_replicas must be a positive integer")
    return catalog_mod.Catalog(engines=engines, sizes=sizes, prices=prices, max_replicas=max_replicas)


def _policies(items: Any, where: str) -> policy.Policy:
    if not isinstance(items, list):
        raise ValueError(f"{where}: policies must be a list")
    rules = []
    for index, item in enumerate(items):
        at = f"{where}: policies[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{at} must be a mapping")
        try:
            mode = policy.Mode(item.get("mode", "auto"))
            resource_type = model.ResourceType(item["resource_type"]) if item.get("resource_type") else None
        except ValueError as e:
            raise ValueError(
                f"{at}: {e} (mode: auto, alert, approve, off; resource_type: database, cache, topic)"
            ) from e
        ignore = item.get("ignore_fields") or []
        if not isinstance(ignore, list):
            raise ValueError(f"{at}: ignore_fields must be a list")
        unknown = sorted(set(map(str, ignore)) - drift.FIELDS)
        if unknown:
            raise ValueError(
                f"{at}: unknown ignore_fields {', '.join(unknown)}; use {', '.join(sorted(drift.FIELDS))}"
            )
        window = None
        if item.get("maintenance_window") is not None:
            raw_window = _mapping(item["maintenance_window"], f"{at}: maintenance_window")
            try:
                window = windows.parse(
                    cron=str(raw_window.get("cron", "")),
                    duration=str(raw_window.get("duration", "")),
                    time_zone=str(raw_window.get("time_zone", "")),
                )
            except windows.WindowError as e:
                raise ValueError(f"{at}: maintenance_window.{e.part}: {e}") from e
        rule_modes: dict[str, policy.Mode] = {}
        for rule_id, rule_mode in _mapping(item.get("rule_modes") or {}, f"{at}: rule_modes").items():
            if str(rule_id) not in drift_rules.BY_ID:
                raise ValueError(
                    f"{at}: rule_modes: unknown drift rule {rule_id}; "
                    f"use {', '.join(sorted(drift_rules.BY_ID))}"
                )
            try:
                rule_modes[str(rule_id)] = policy.Mode(str(rule_mode))
            except ValueError as e:
                raise ValueError(f"{at}: rule_modes.{rule_id}: {e} (auto, alert, approve, off)") from e
        rules.append(
            policy.Rule(
                namespace=str(item.get("namespace", policy.ANY)),
                resource_type=resource_type,
                mode=mode,
                ignore_fields=frozenset(str(f) for f in ignore),
                window=window,
                rule_modes=tuple(sorted(rule_modes.items())),
            )
        )
    return policy.Policy(rules=tuple(rules))


def _budgets(items: Any, where: str) -> dict[str, float]:
    budgets: dict[str, float] = {}
    for namespace, amount in _mapping(items, f"{where}: budgets").items():
        at = f"{where}: budgets.{namespace}"
        problems: list[errors.FieldViolation] = []
        validation.check_namespace(str(namespace), problems, field="budgets")
        if problems:
            raise ValueError(f"{at}: {problems[0].description}")
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise ValueError(f"{at} must be a number (the monthly budget in the prices' currency)")
        problem = costs.amount_problem(float(amount))
        if problem:
            raise ValueError(f"{at} {problem}")
        budgets[str(namespace)] = float(amount)
    return budgets


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping")
    return value
