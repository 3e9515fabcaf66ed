"""The drift rules as data: one row per rule, from which everything else that names rules derives.

``drift`` builds each item from its rule's row (class, severity, default action); the policy field
list (what ``ignore_fields`` may name), the fields AcceptDrift can take, the rules that mean "an
object is gone", the README's rule table and the tests all read this table instead of keeping
copies. The defaults follow the seed's drift rules (DESIGN section 5); a policy may change an
action per namespace and type, never the class.

Pure code: no I/O.
"""

from __future__ import annotations

import dataclasses

from broker.domain import model

E, U = model.DriftClass.EXPECTED, model.DriftClass.UNEXPECTED
INFO, WARNING, CRITICAL = model.Severity.INFO, model.Severity.WARNING, model.Severity.CRITICAL
NONE, AUTO, ALERT = model.Action.NONE, model.Action.AUTO_REMEDIATE, model.Action.ALERT_ONLY


@dataclasses.dataclass(frozen=True)
class Rule:
    """One drift rule: which difference it names, and how it is classified by default.

    ``fields`` are the ``DriftItem.field`` values its items carry; ``missing`` marks rules that
    say an object is gone (their first appearance is a ResourceMissing event); ``acceptable``
    fields are those AcceptDrift may take as the new desired value.
    """

    rule_id: str
    fields: tuple[str, ...]
    drift_class: model.DriftClass
    severity: model.Severity
    action: model.Action
    difference: str
    missing: bool = False
    acceptable: tuple[str, ...] = ()


RULES: tuple[Rule, ...] = (
    Rule("version.patch", ("version",), E, INFO, NONE, "newer patch within the desired float"),
    Rule("version.unknown", ("version",), E, INFO, NONE, "the image tag names no version"),
    Rule("version.minor", ("version",), U, WARNING, ALERT, "other minor version", acceptable=("version",)),
    Rule(
        "version.downgrade",
        ("version",),
        U,
        WARNING,
        ALERT,
        "older patch than desired",
        acceptable=("version",),
    ),
    Rule(
        "version.major",
        ("version",),
        U,
        CRITICAL,
        ALERT,
        "other major version (data-affecting)",
        acceptable=("version",),
    ),
    Rule("engine.changed", ("engine",), U, CRITICAL, ALERT, "another engine's image is running"),
    Rule(
        "replicas.changed",
        ("replicas",),
        U,
        WARNING,
        AUTO,
        "replicas changed by hand",
        acceptable=("replicas",),
    ),
    Rule(
        "size.changed",
        ("size",),
        U,
        CRITICAL,
        ALERT,
        "cpu/memory/storage (cost-impacting)",
        acceptable=("size",),
    ),
    Rule(
        "object.missing",
        ("statefulset", "service", "kafkatopic"),
        U,
        CRITICAL,
        AUTO,
        "StatefulSet/Service/KafkaTopic gone",
        missing=True,
    ),
    Rule("secret.missing", ("secret",), U, CRITICAL, ALERT, "credentials Secret gone", missing=True),
    Rule("secret.changed", ("secret",), U, CRITICAL, ALERT, "credentials Secret edited"),
    Rule("labels.changed", ("labels",), U, WARNING, AUTO, "labels the broker owns changed"),
    Rule("config.changed", ("config",), U, WARNING, AUTO, "container env changed by hand"),
    Rule(
        "topic.partitions.decreased",
        ("partitions",),
        U,
        CRITICAL,
        ALERT,
        "fewer partitions (data-affecting)",
        acceptable=("partitions",),
    ),
    Rule(
        "topic.partitions.increased",
        ("partitions",),
        U,
        WARNING,
        ALERT,
        "more partitions (cannot be undone)",
        acceptable=("partitions",),
    ),
    Rule(
        "topic.retention.shortened",
        ("retention_ms",),
        U,
        CRITICAL,
        ALERT,
        "shorter retention (data-affecting)",
        acceptable=("retention_ms",),
    ),
    Rule(
        "topic.retention.changed",
        ("retention_ms",),
        U,
        WARNING,
        AUTO,
        "longer retention",
        acceptable=("retention_ms",),
    ),
    Rule(
        "topic.replicas.changed",
        ("replicas",),
        U,
        WARNING,
        AUTO,
        "other replication factor",
        acceptable=("replicas",),
    ),
    Rule(
        "field.unreadable",
        ("replicas", "partitions", "retention_ms"),
        U,
        WARNING,
        AUTO,
        "a compared value that cannot be read",
    ),
)

BY_ID: dict[str, Rule] = {rule.rule_id: rule for rule in RULES}

# Every ``DriftItem.field`` the rules produce: what policies may ignore.
FIELDS: frozenset[str] = frozenset(field for rule in RULES for field in rule.fields)
# The rules that say an object is gone.
MISSING: frozenset[str] = frozenset(rule.rule_id for rule in RULES if rule.missing)
# The fields AcceptDrift can make desired, in a stable order.
ACCEPTABLE: tuple[str, ...] = tuple(dict.fromkeys(f for rule in RULES for f in rule.acceptable))


def item(
    rule_id: str,
    field: str,
    desired: object,
    actual: object,
    *,
    message: str,
    changed_by: str = "",
    cost_delta: float | None = None,
) -> model.DriftItem:
    """A drift item of a rule, classified as its row says (a policy may change the action later)."""
    rule = BY_ID[rule_id]
    if field not in rule.fields:
        raise ValueError(f"rule {rule_id} does not produce items for field {field!r}")
    return model.DriftItem(
        rule_id=rule_id,
        field=field,
        desired=str(desired),
        actual=str(actual),
        drift_class=rule.drift_class,
        severity=rule.severity,
        action=rule.action,
        message=message,
        changed_by=changed_by,
        monthly_cost_delta=cost_delta,
    )


def markdown_table() -> str:
    """The rules as a Markdown table (the README's copy is generated from it)."""
    lines = [
        "| rule id | difference | fields | class | severity | default action |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rule in RULES:
        lines.append(
            f"| `{rule.rule_id}` | {rule.difference} | {', '.join(rule.fields)} | {rule.drift_class.value} "
            f"| {rule.severity.value} | {rule.action.value} |"
        )
    return "\n".join(lines)
