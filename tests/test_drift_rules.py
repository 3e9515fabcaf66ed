"""The drift engine's rules, health, usage and cost, as pure functions (DESIGN section 5)."""

from __future__ import annotations

import dataclasses
import datetime
import decimal

import pytest

from broker.domain import catalog, drift, model, naming, policy, rules

NOW = datetime.datetime(2025, 10, 3, 9, 30, tzinfo=datetime.UTC)
CATALOG = catalog.DEFAULT_CATALOG
MEDIUM = CATALOG.sizes["medium"]
LARGE = CATALOG.sizes["large"]


def _deployment(
    resource_type: model.ResourceType = model.ResourceType.DATABASE,
    spec: model.ResourceSpec | None = None,
) -> model.Deployment:
    op = model.Operation(
        operation_id=model.OperationId("op-1"),
        type=model.OperationType.PROVISION,
        state=model.OperationState.SUCCEEDED,
        generation=1,
        message="",
        create_time=NOW,
        update_time=NOW,
    )
    return model.Deployment(
        deployment_id=model.DeploymentId("deploy-abc123"),
        namespace=model.Namespace("team-platform"),
        resource_type=resource_type,
        resource_name=model.ResourceName("postgres-app-db"),
        desired_spec=spec
        or model.ResourceSpec(engine="postgresql", version="15", size="medium", replicas=1, resources=MEDIUM),
        generation=1,
        phase=model.Phase.READY,
        callback_url="",
        last_operation=op,
        create_time=NOW,
        update_time=NOW,
    )


DEPLOYMENT = _deployment()
LABELS = naming.labels(DEPLOYMENT.deployment_id, DEPLOYMENT.resource_type, DEPLOYMENT.resource_name)


def _pod(
    index: int, *, image: str = "postgres:15.2", ready: bool = True, **kw: object
) -> drift.PodObservation:
    fields: dict[str, object] = {
        "name": f"postgres-app-db-{index}",
        "phase": "Running",
        "ready": ready,
        "restart_count": 0,
        "waiting_reason": "",
        "image": image,
        "cpu_usage": decimal.Decimal("0.25"),
        "memory_usage": decimal.Decimal(512 * 2**20),
    }
    fields.update(kw)
    return drift.PodObservation(**fields)  # type: ignore[arg-type]


def _observation(**changes: object) -> drift.Observation:
    healthy = drift.Observation(
        readable=True,
        observed_at=NOW,
        workload=drift.WorkloadObservation(
            replicas=1, image="postgres:15.2", resources=MEDIUM, labels=LABELS
        ),
        service_present=True,
        secret_present=True,
        pods=(_pod(0),),
        storage_capacity=decimal.Decimal(20 * 2**30),  # the medium tier's claim
        metrics_available=True,
    )
    return dataclasses.replace(healthy, **changes)  # type: ignore[arg-type]


def _evaluate(obs: drift.Observation, deployment: model.Deployment = DEPLOYMENT) -> drift.Evaluation:
    return drift.evaluate(deployment, obs, catalog=CATALOG, rules=policy.Policy())


def test_the_seed_example_is_expected_patch_drift_healthy_with_usage_and_cost() -> None:
    result = _evaluate(_observation())
    assert result.details() == [
        "Version mismatch: desired=15, actual=15.2",
        "This is expected patch version drift",
    ]
    (item,) = result.items
    assert (item.rule_id, item.drift_class, item.action) == (
        "version.patch",
        model.DriftClass.EXPECTED,
        model.Action.NONE,
    )
    assert result.unexpected == ()
    assert result.health is model.Health.HEALTHY
    assert result.actual_spec == model.ResourceSpec(
        engine="postgresql", version="15.2", size="medium", replicas=1, resources=MEDIUM
    )
    assert result.usage == drift.Usage(cpu="250m", memory="512Mi", storage="20Gi", replicas=1)
    assert result.monthly_cost == 45.5


def _scaled() -> drift.Observation:
    workload = drift.WorkloadObservation(
        replicas=3,
        image="postgres:15.2",
        resources=MEDIUM,
        labels=LABELS,
        field_managers={"replicas": "kubectl-scale"},
    )
    return _observation(workload=workload, pods=(_pod(0), _pod(1), _pod(2)))


ROWS = [
    # (name, observation, rule id, class, action, sentence, author)
    (
        "replicas scaled by hand",
        _scaled(),
        "replicas.changed",
        model.Action.AUTO_REMEDIATE,
        "Replica count mismatch: desired=1, actual=3",
        "kubectl-scale",
    ),
    (
        "service deleted",
        _observation(service_present=False),
        "object.missing",
        model.Action.AUTO_REMEDIATE,
        "Service postgres-app-db is missing",
        "",
    ),
    (
        "statefulset deleted",
        _observation(workload=None, pods=()),
        "object.missing",
        model.Action.AUTO_REMEDIATE,
        "StatefulSet postgres-app-db is missing",
        "",
    ),
    (
        "secret deleted",
        _observation(secret_present=False),
        "secret.missing",
        model.Action.ALERT_ONLY,
        "Secret postgres-app-db-credentials is missing",
        "",
    ),
    (
        "secret edited",
        _observation(secret_changed=True),
        "secret.changed",
        model.Action.ALERT_ONLY,
        "Secret postgres-app-db-credentials was changed outside the broker",
        "",
    ),
    (
        "major version set by hand",
        _observation(
            pods=(_pod(0, image="postgres:16"),),
            workload=drift.WorkloadObservation(
                replicas=1,
                image="postgres:16",
                resources=MEDIUM,
                labels=LABELS,
                field_managers={"image": "kubectl-set"},
            ),
        ),
        "version.major",
        model.Action.ALERT_ONLY,
        "Version mismatch: desired=15, actual=16",
        "kubectl-set",
    ),
    (
        "resources changed",
        _observation(
            workload=drift.WorkloadObservation(
                replicas=1,
                image="postgres:15.2",
                resources=LARGE,
                labels=LABELS,
                field_managers={"resources": "kubectl-set"},
            )
        ),
        "size.changed",
        model.Action.ALERT_ONLY,
        "Size mismatch: desired=medium, actual=large",
        "kubectl-set",
    ),
    (
        "owned label removed",
        _observation(
            workload=drift.WorkloadObservation(
                replicas=1,
                image="postgres:15.2",
                resources=MEDIUM,
                labels={k: v for k, v in LABELS.items() if k != naming.LABEL_NAME},
                field_managers={"labels": "kubectl-label"},
            )
        ),
        "labels.changed",
        model.Action.AUTO_REMEDIATE,
        "Labels changed: app.kubernetes.io/name",
        "kubectl-label",
    ),
]


@pytest.mark.parametrize(
    ("name", "obs", "rule", "action", "sentence", "author"), ROWS, ids=[r[0] for r in ROWS]
)
def test_each_row_of_the_drift_table(
    name: str, obs: drift.Observation, rule: str, action: model.Action, sentence: str, author: str
) -> None:
    result = _evaluate(obs)
    matching = [i for i in result.unexpected if i.rule_id == rule]
    assert len(matching) == 1, [i.rule_id for i in result.items]
    item = matching[0]
    assert item.action is action
    assert item.message == sentence
    assert item.changed_by == author
    assert sentence in result.details()


def test_cost_deltas_are_actual_minus_desired() -> None:
    (replicas,) = [i for i in _evaluate(_scaled()).items if i.rule_id == "replicas.changed"]
    assert replicas.monthly_cost_delta == 91.0  # two more medium replicas at 45.50
    size_obs = ROWS[6][1]
    (size,) = [i for i in _evaluate(size_obs).items if i.rule_id == "size.changed"]
    # large: 1 core x 56 + 4 GiB x 9.5 + 100 GiB x 0.40 = 134.00, against medium's 45.50.
    assert size.monthly_cost_delta == 88.5
    assert size.monthly_cost_delta is not None
    assert size.monthly_cost_delta > 0


def test_a_size_matching_no_tier_is_custom_with_raw_figures() -> None:
    odd = dataclasses.replace(MEDIUM, cpu_request="750m")
    workload = drift.WorkloadObservation(replicas=1, image="postgres:15.2", resources=odd, labels=LABELS)
    (item,) = [i for i in _evaluate(_observation(workload=workload)).items if i.rule_id == "size.changed"]
    assert item.actual.startswith("custom (cpu 750m/1")


@pytest.mark.parametrize(
    ("desired", "actual", "rule", "expected"),
    [
        ("15", "15.2", "version.patch", True),
        ("15.2", "15.2.1", "version.patch", True),
        ("15.2.0", "15.2.3", "version.patch", True),
        ("15.2", "15.3", "version.minor", False),
        ("15.2.3", "15.2.1", "version.downgrade", False),
        ("15", "16", "version.major", False),
        ("15.2", "14.9", "version.major", False),
    ],
)
def test_version_classification(desired: str, actual: str, rule: str, expected: bool) -> None:
    item = drift.version_item(desired, actual, "")
    assert item is not None
    assert item.rule_id == rule
    assert (item.drift_class is model.DriftClass.EXPECTED) is expected
    assert drift.version_item("15.2", "15.2", "") is None


def test_topic_rules() -> None:
    spec = model.ResourceSpec(
        engine="kafka",
        version="",
        size="",
        replicas=3,
        topic=model.TopicSpec(partitions=6, retention_ms=7 * 86_400_000),
    )
    deployment = _deployment(model.ResourceType.TOPIC, spec)
    labels = naming.labels(deployment.deployment_id, deployment.resource_type, deployment.resource_name)
    topic = drift.TopicObservation(
        partitions=3,
        replicas=3,
        retention_ms=86_400_000,
        ready=True,
        labels=labels,
        field_managers={"partitions": "kubectl-patch", "retention_ms": "kubectl-patch"},
    )
    result = _evaluate(drift.Observation(readable=True, observed_at=NOW, topic=topic), deployment)
    rules = {i.rule_id: i for i in result.items}
    assert set(rules) == {"topic.partitions.decreased", "topic.retention.shortened"}
    assert all(
        i.action is model.Action.ALERT_ONLY and i.changed_by == "kubectl-patch" for i in rules.values()
    )
    assert rules["topic.partitions.decreased"].message == "Partition count mismatch: desired=6, actual=3"
    assert result.health is model.Health.HEALTHY
    gone = _evaluate(drift.Observation(readable=True, observed_at=NOW), deployment)
    assert [i.rule_id for i in gone.items] == ["object.missing"]
    assert gone.health is model.Health.UNHEALTHY


@pytest.mark.parametrize(
    ("changes", "health"),
    [
        ({}, model.Health.HEALTHY),
        ({"readable": False}, model.Health.UNKNOWN),
        (
            {"pods": (_pod(0, ready=False, waiting_reason="CrashLoopBackOff", restart_count=4),)},
            model.Health.UNHEALTHY,
        ),
        (
            {"pods": (_pod(0, restart_count=5, last_restart=NOW - datetime.timedelta(minutes=1)),)},
            model.Health.DEGRADED,
        ),
        # Restart counts only grow: restarts long ago no longer make a healthy pod Degraded.
        (
            {"pods": (_pod(0, restart_count=5, last_restart=NOW - datetime.timedelta(hours=1)),)},
            model.Health.HEALTHY,
        ),
        ({"pods": ()}, model.Health.UNHEALTHY),
        ({"service_present": False}, model.Health.UNHEALTHY),
    ],
)
def test_health(changes: dict[str, object], health: model.Health) -> None:
    assert _evaluate(_observation(**changes)).health is health


def test_degraded_when_only_some_desired_replicas_are_ready() -> None:
    spec = dataclasses.replace(DEPLOYMENT.desired_spec, replicas=2)
    obs = _observation(pods=(_pod(0), _pod(1, ready=False)))
    assert _evaluate(obs, _deployment(spec=spec)).health is model.Health.DEGRADED


def test_an_unreadable_cluster_reports_nothing_made_up() -> None:
    result = _evaluate(_observation(readable=False))
    assert (result.items, result.actual_spec, result.usage, result.monthly_cost) == ((), None, None, None)
    assert result.health is model.Health.UNKNOWN


def test_usage_is_absent_not_zero_without_metrics() -> None:
    result = _evaluate(_observation(metrics_available=False))
    assert result.usage == drift.Usage(cpu=None, memory=None, storage="20Gi", replicas=1)


def test_policy_modes_and_ignore_rules() -> None:
    obs = _scaled()
    alert = policy.Policy(rules=(policy.Rule(namespace="team-platform", mode=policy.Mode.ALERT),))
    result = drift.evaluate(DEPLOYMENT, obs, catalog=CATALOG, rules=alert)
    assert [i.action for i in result.unexpected] == [model.Action.ALERT_ONLY]

    off = policy.Policy(rules=(policy.Rule(resource_type=model.ResourceType.DATABASE, mode=policy.Mode.OFF),))
    assert drift.evaluate(DEPLOYMENT, obs, catalog=CATALOG, rules=off).items == ()

    ignore = policy.Policy(rules=(policy.Rule(ignore_fields=frozenset({"replicas"})),))
    assert [i.rule_id for i in drift.evaluate(DEPLOYMENT, obs, catalog=CATALOG, rules=ignore).items] == [
        "version.patch"
    ]
    # The most specific rule wins: namespace+type over namespace over type.
    layered = policy.Policy(
        rules=(
            policy.Rule(namespace="team-platform", mode=policy.Mode.OFF),
            policy.Rule(
                namespace="team-platform", resource_type=model.ResourceType.DATABASE, mode=policy.Mode.AUTO
            ),
        )
    )
    assert layered.rule_for("team-platform", model.ResourceType.DATABASE).mode is policy.Mode.AUTO
    assert layered.rule_for("team-platform", model.ResourceType.CACHE).mode is policy.Mode.OFF
    assert layered.rule_for("elsewhere", model.ResourceType.CACHE).mode is policy.Mode.AUTO


def test_storage_usage_and_cost_count_the_same_claims_retained_ones_included() -> None:
    """Scaled from 3 to 1: the two claims a StatefulSet keeps still hold storage and cost money."""
    retained = _evaluate(_observation(storage_capacity=decimal.Decimal(3 * 20 * 2**30)))
    assert retained.usage is not None
    assert retained.usage.storage == "60Gi"
    # One replica's compute (0.5 core, 1 GiB) and 60 GiB of storage at the default prices.
    assert retained.monthly_cost == round(0.5 * 56.0 + 1 * 9.5 + 60 * 0.40, 2)


def test_a_missing_secret_makes_a_database_unhealthy() -> None:
    result = _evaluate(_observation(secret_present=False))
    assert result.health is model.Health.UNHEALTHY
    assert "secret.missing" in {i.rule_id for i in result.items}


def test_the_rule_table_is_the_one_source_of_rule_names_and_fields() -> None:
    """Policies, AcceptDrift and the missing-object events read the table, not copies of it."""
    ids = [r.rule_id for r in rules.RULES]
    assert len(ids) == len(set(ids))
    # Every row of the seed's table above is a rule of the table, classified as its row says.
    for _, obs, rule_id, action, _, _ in ROWS:
        (item,) = [i for i in _evaluate(obs).items if i.rule_id == rule_id]
        row = rules.BY_ID[rule_id]
        assert (item.drift_class, item.severity, item.action) == (row.drift_class, row.severity, action)
        assert item.field in row.fields
    assert {f for r in rules.RULES for f in r.fields} == drift.FIELDS
    assert {"object.missing", "secret.missing"} == rules.MISSING
    assert set(rules.ACCEPTABLE) == {"replicas", "version", "size", "partitions", "retention_ms"}
    with pytest.raises(ValueError, match="does not produce items for field"):
        rules.item("replicas.changed", "labels", 1, 2, message="")
