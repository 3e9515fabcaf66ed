"""Remediation policy: per namespace and resource type, ``auto``, ``alert``, ``approve`` or ``off``,
plus fields to ignore (like Flux's ``enabled`` / ``warn`` / ``disabled``, with a human gate) and
a maintenance window.

- ``auto``: the default table of ``broker.domain.drift`` applies: what it marks auto-remediate is
  re-applied by the broker.
- ``alert``: nothing is changed automatically; auto-remediate items become alert-only.
- ``approve``: what the table marks auto-remediate becomes approval-required: the broker proposes
  the remediation and carries it out once a person approves it (``broker.domain.approval``).
- ``off``: drift is not reported for the matching resources at all.

A rule's ``window`` (``broker.domain.windows``) limits automatic remediation to its maintenance
windows; outside them it is deferred. It does not hold back an approved remediation.

The most specific rule wins: namespace and type, then namespace, then type, then the default.
"""

from __future__ import annotations

import dataclasses
import enum

from broker.domain import model, windows


class Mode(enum.Enum):
    """What happens about drift on the resources a rule matches."""

    AUTO = "auto"
    ALERT = "alert"
    OFF = "off"
    APPROVE = "approve"


ANY = "*"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A policy for one namespace (or ``*``) and one resource type (or None for all)."""

    namespace: str = ANY
    resource_type: model.ResourceType | None = None
    mode: Mode = Mode.AUTO
    ignore_fields: frozenset[str] = frozenset()
    window: windows.Window | None = None
    # Drift rules with a mode of their own (rule id, mode), sorted by rule id.
    rule_modes: tuple[tuple[str, Mode], ...] = ()

    def mode_for(self, rule_id: str) -> Mode:
        """The mode of one drift rule: its own, or the policy's."""
        return dict(self.rule_modes).get(rule_id, self.mode)

    def specificity(self) -> int:
        """Higher is more specific: namespace counts more than type."""
        return (2 if self.namespace != ANY else 0) + (1 if self.resource_type is not None else 0)

    def matches(self, namespace: str, resource_type: model.ResourceType) -> bool:
        """Whether this rule applies to a resource."""
        return self.namespace in (ANY, namespace) and self.resource_type in (None, resource_type)


@dataclasses.dataclass(frozen=True)
class Policy:
    """An ordered set of rules; with none, everything is ``auto`` with nothing ignored."""

    rules: tuple[Rule, ...] = ()

    def rule_for(self, namespace: str, resource_type: model.ResourceType) -> Rule:
        """The most specific matching rule, or the default."""
        matching = [r for r in self.rules if r.matches(namespace, resource_type)]
        if not matching:
            return Rule()
        return max(matching, key=Rule.specificity)

    def with_rule(self, rule: Rule) -> Policy:
        """This policy with ``rule`` replacing any rule for the same namespace and type."""
        kept = tuple(
            r for r in self.rules if (r.namespace, r.resource_type) != (rule.namespace, rule.resource_type)
        )
        return Policy(rules=(*kept, rule))

    def apply(
        self, namespace: str, resource_type: model.ResourceType, items: list[model.DriftItem]
    ) -> list[model.DriftItem]:
        """The items as the policy has them: ignored fields dropped, actions adjusted to the mode."""
        rule = self.rule_for(namespace, resource_type)
        if rule.mode is Mode.OFF and not rule.rule_modes:
            return []
        instead = {Mode.ALERT: model.Action.ALERT_ONLY, Mode.APPROVE: model.Action.APPROVAL_REQUIRED}
        kept = []
        for item in items:
            mode = rule.mode_for(item.rule_id)
            if mode is Mode.OFF or item.field in rule.ignore_fields:
                continue
            if mode in instead and item.action is model.Action.AUTO_REMEDIATE:
                item = dataclasses.replace(item, action=instead[mode])
            kept.append(item)
        return kept
