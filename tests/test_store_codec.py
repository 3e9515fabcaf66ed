"""The row encodings both store adapters share (broker.store.codec): what goes in comes back out."""

from __future__ import annotations

import dataclasses
import datetime

from broker.domain import model
from broker.store import codec


def test_a_drift_item_round_trips_with_every_field() -> None:
    item = model.DriftItem(
        rule_id="replicas.changed",
        field="replicas",
        desired="1",
        actual="3",
        drift_class=model.DriftClass.UNEXPECTED,
        severity=model.Severity.WARNING,
        action=model.Action.AUTO_REMEDIATE,
        message="Replica count changed",
        changed_by="kubectl",
        monthly_cost_delta=91.0,
        detect_time=datetime.datetime(2026, 12, 1, 12, 0, 0, 123000, tzinfo=datetime.UTC),
    )
    encoded = codec.item_to_dict(item)
    # A field added to DriftItem must be written too (the encoding lists them one by one).
    assert set(encoded) == {f.name for f in dataclasses.fields(model.DriftItem)}
    assert codec.item_from_dict(encoded) == item
    assert codec.items_from_json(
        codec.items_to_json((item, dataclasses.replace(item, detect_time=None)))
    ) == (
        item,
        dataclasses.replace(item, detect_time=None),
    )
