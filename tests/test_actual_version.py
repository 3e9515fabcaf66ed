"""The running version comes from what the pods were asked to run, not from the runtime's spelling.

kube-apiserver documents ``status.containerStatuses[].image`` as possibly "resolved by the runtime":
another tag sharing the digest, ``latest``, or a digest reference. Fed such strings, the drift code
must not raise version or engine alerts; an image that names no version is an informational item.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from broker_client.v1 import broker_pb2 as pb
from test_e2e_drift import Manager, item_of
from test_e2e_drift import manager as manager

from broker.domain import catalog, drift, model, naming, policy
from broker.kube import entries, observer

DIGEST = "sha256:" + "ab" * 32


def pod(spec_image: str, status_image: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "db-0"},
        "spec": {"containers": [{"name": "postgresql", "image": spec_image}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {
                    "name": "postgresql",
                    "image": status_image,
                    "imageID": f"docker.io/library/postgres@{DIGEST}",
                }
            ],
        },
    }


@pytest.mark.parametrize(
    "status_image",
    [
        f"docker.io/library/postgres@{DIGEST}",  # a digest reference
        "docker.io/library/postgres:latest",  # another tag of the same digest
        "postgres:15",  # a floating tag that shares the digest
        "sha256:" + "cd" * 32,  # an image id only
    ],
)
def test_the_pods_spec_image_is_read_whatever_the_runtime_reports(status_image: str) -> None:
    observed = observer._pod(entries.project("Pod", pod("postgres:15.2", status_image)), None)  # type: ignore[arg-type]
    assert observed.image == "postgres:15.2"


def deployment(version: str = "15") -> model.Deployment:
    now = datetime.datetime.now(datetime.UTC)
    return model.Deployment(
        deployment_id=model.DeploymentId("dep-1"),
        namespace=model.Namespace("team-platform"),
        resource_type=model.ResourceType.DATABASE,
        resource_name=model.ResourceName("db"),
        desired_spec=model.ResourceSpec(
            engine="postgresql",
            version=version,
            size="small",
            replicas=1,
            resources=catalog.DEFAULT_CATALOG.sizes["small"],
        ),
        generation=1,
        phase=model.Phase.READY,
        callback_url="",
        last_operation=model.Operation(
            operation_id=model.OperationId("op-1"),
            type=model.OperationType.PROVISION,
            state=model.OperationState.SUCCEEDED,
            generation=1,
            message="",
            create_time=now,
            update_time=now,
        ),
        create_time=now,
        update_time=now,
    )


def verdict(image: str) -> drift.Evaluation:
    small = catalog.DEFAULT_CATALOG.sizes["small"]
    obs = drift.Observation(
        readable=True,
        observed_at=datetime.datetime.now(datetime.UTC),
        workload=drift.WorkloadObservation(
            replicas=1,
            image=image,
            resources=small,
            labels=naming.labels(
                model.DeploymentId("dep-1"), model.ResourceType.DATABASE, model.ResourceName("db")
            ),
        ),
        service_present=True,
        secret_present=True,
        pods=(
            drift.PodObservation(
                name="db-0", phase="Running", ready=True, restart_count=0, waiting_reason="", image=image
            ),
        ),
    )
    return drift.evaluate(deployment(), obs, catalog=catalog.DEFAULT_CATALOG, rules=policy.Policy())


@pytest.mark.parametrize("image", ["postgres:latest", f"postgres@{DIGEST}", "postgres:bookworm", "postgres"])
def test_an_image_that_names_no_version_is_informational_never_an_alert(image: str) -> None:
    result = verdict(image)
    rules = {i.rule_id: i for i in result.items}
    assert "engine.changed" not in rules
    assert "version.major" not in rules
    unknown = rules["version.unknown"]
    assert unknown.drift_class is model.DriftClass.EXPECTED
    assert unknown.severity is model.Severity.INFO
    assert unknown.action is model.Action.NONE
    assert result.unexpected == ()


def test_a_registry_path_and_digest_still_read_the_version() -> None:
    result = verdict(f"registry.example.com:5000/library/postgres:15.2@{DIGEST}")
    assert [i.rule_id for i in result.items] == ["version.patch"]


async def test_a_runtime_resolved_spelling_raises_no_false_alert_end_to_end(
    manager: Manager, sandbox: Any
) -> None:
    """The sandbox's kubelet reports a digest for the running image: nothing unexpected."""
    sandbox.faults.set_image_resolution({"postgres:15.2": f"docker.io/library/postgres@{DIGEST}"})
    deployment_id = (await manager.provision("db-digest")).deployment_id
    state = await manager.wait_ready(deployment_id)
    assert state.actual_spec.version == "15.2"
    assert state.actual_spec.engine == "postgresql"
    assert [i.rule_id for i in state.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED] == []
    assert item_of(state, "version.patch") is not None
