"""Server reflection as an operator meets it: grpcurl lists, describes (methods too, with the proto's
comments) and calls; ``grpc.reflection.v1`` answers as well as ``v1alpha``; ``--no-reflection``
turns both off."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from broker_client.v1 import broker_pb2
from conftest import PLATFORM_TOKEN, RunningBroker, broker_running
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2

from broker.api import reflection

GRPCURL = pathlib.Path(sys.executable).parent / "grpcurl"
needs_grpcurl = pytest.mark.skipif(not GRPCURL.exists(), reason=f"grpcurl is not installed at {GRPCURL}")

BROKER_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"]
V1_PATH = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA_PATH = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
# Field numbers of FileDescriptorProto.service and ServiceDescriptorProto.method, for source locations.
SERVICE_FIELD, METHOD_FIELD = 6, 2


async def grpcurl(
    broker: RunningBroker,
    *args: str,
    flags: tuple[str, ...] = (),
    data: dict[str, object] | None = None,
    token: bool = False,
):
    """Run grpcurl against the broker; the test's event loop keeps serving while it runs."""
    argv = [str(GRPCURL), "-plaintext", "-max-time", "20", *flags]
    if token:
        argv += ["-H", f"authorization: Bearer {PLATFORM_TOKEN}"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    argv += [broker.grpc_target, *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode, out.decode(), err.decode()


async def reflect(channel: grpc.aio.Channel, path: str, *requests: object) -> list[object]:
    """Send ``requests`` on one reflection stream at ``path``; the answers, in order.

    v1alpha's message classes encode v1's requests too: the two protocols' messages are the same on
    the wire (``test_a_client_with_v1s_own_messages_is_answered`` checks that with v1's own).
    """
    call = channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [answer async for answer in call(iter(requests), timeout=10)]


def files_of(answer: object) -> list[descriptor_pb2.FileDescriptorProto]:
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]


def comment_of_method(file: descriptor_pb2.FileDescriptorProto, service: str, method: str) -> str:
    s = next(i for i, d in enumerate(file.service) if d.name == service)
    m = next(i for i, d in enumerate(file.service[s].method) if d.name == method)
    [location] = [
        loc for loc in file.source_code_info.location if list(loc.path) == [SERVICE_FIELD, s, METHOD_FIELD, m]
    ]
    return location.leading_comments


@pytest.fixture
async def broker_without_reflection(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> AsyncIterator[RunningBroker]:
    """Like ``running_broker``, started as ``broker serve --no-reflection`` would be."""
    async with broker_running(tmp_path / "data", tokens_file, reflection=False) as running:
        yield running


# grpcurl, as an operator runs it


@needs_grpcurl
async def test_list_shows_every_service_and_both_reflection_versions(running_broker: RunningBroker):
    code, out, err = await grpcurl(running_broker, "list")

    assert code == 0, err
    assert out.split() == [
        "broker.v1.BrokerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


@needs_grpcurl
async def test_describe_the_service_shows_every_rpc_and_the_services_comment(running_broker: RunningBroker):
    code, out, err = await grpcurl(running_broker, "describe", "broker.v1.BrokerService")

    assert code == 0, err
    assert "broker.v1.BrokerService is a service:" in out
    assert "// BrokerService provisions databases, caches and topics in Kubernetes" in out
    for method in BROKER_SERVICE.methods:
        assert f"rpc {method.name} (" in out, method.name
        assert f"// {method.name} " in out, f"no comment above {method.name}"


@needs_grpcurl
async def test_describe_every_method_finds_it_and_shows_its_comment(running_broker: RunningBroker):
    methods = list(BROKER_SERVICE.methods)
    results = await asyncio.gather(
        *(grpcurl(running_broker, "describe", method.full_name) for method in methods)
    )

    for method, (code, out, err) in zip(methods, results, strict=True):
        assert "Symbol not found" not in err, method.full_name
        assert code == 0, err
        assert f"{method.full_name} is a method:" in out
        # Every RPC's comment in broker.proto starts with the RPC's name.
        assert f"// {method.name} " in out, out
        assert f"rpc {method.name} ( .{method.input_type.full_name} )" in out
    provision = results[methods.index(BROKER_SERVICE.methods_by_name["Provision"])][1]
    assert (
        "// Provision creates or updates the desired state of one resource and returns at once" in provision
    )
    assert "// repeating the same namespace, type, name and spec is a no-op" in provision


@needs_grpcurl
async def test_describe_a_message_shows_its_field_comments(running_broker: RunningBroker):
    code, out, err = await grpcurl(running_broker, "describe", "broker.v1.ProvisionRequest")

    assert code == 0, err
    assert "broker.v1.ProvisionRequest is a message:" in out
    assert "// ProvisionRequest asks for a resource to be created or updated." in out
    assert "// Namespace is the Kubernetes namespace to create the resource in: a DNS-1123 label." in out
    assert "// RequestId makes the request idempotent: a retry with the same id gets the first answer." in out
    assert "string request_id = 6;" in out


@needs_grpcurl
async def test_describe_an_enum_and_one_of_its_values_shows_their_comments(running_broker: RunningBroker):
    (code, out, err), (value_code, value_out, value_err) = await asyncio.gather(
        grpcurl(running_broker, "describe", "broker.v1.State"),
        grpcurl(running_broker, "describe", "broker.v1.State.STATE_PENDING"),
    )

    assert code == 0, err
    assert "broker.v1.State is an enum:" in out
    assert "// State is the lifecycle phase of a deployment as the broker reports it." in out
    assert value_code == 0, value_err
    assert "broker.v1.State.STATE_PENDING is an enum value:" in value_out
    assert (
        "// The request was accepted and persisted, and the workload has not been created yet." in value_out
    )


@needs_grpcurl
async def test_health_and_both_reflection_services_are_describable(running_broker: RunningBroker):
    results = await asyncio.gather(
        grpcurl(running_broker, "describe", "grpc.health.v1.Health.Check"),
        grpcurl(running_broker, "describe", "grpc.reflection.v1.ServerReflection"),
        grpcurl(running_broker, "describe", "grpc.reflection.v1alpha.ServerReflection.ServerReflectionInfo"),
    )

    for code, _, err in results:
        assert code == 0, err
    health, v1, v1alpha = (out for _, out, _ in results)
    assert "rpc Check ( .grpc.health.v1.HealthCheckRequest )" in health
    assert "stream .grpc.reflection.v1.ServerReflectionRequest" in v1
    assert "stream .grpc.reflection.v1alpha.ServerReflectionResponse" in v1alpha


@needs_grpcurl
async def test_calls_through_reflection_with_a_token(running_broker: RunningBroker):
    code, out, err = await grpcurl(
        running_broker,
        "broker.v1.BrokerService/Provision",
        data={
            "namespace": "team-platform",
            "resource_type": "RESOURCE_TYPE_CACHE",
            "resource_name": "redis-sessions",
            "spec": {"engine": "redis", "version": "7", "size": "small"},
        },
        flags=("-use-reflection",),
        token=True,
    )
    assert code == 0, err
    deployment_id = json.loads(out)["deployment_id"]

    code, out, err = await grpcurl(
        running_broker,
        "broker.v1.BrokerService/GetResourceState",
        data={"namespace": "team-platform"},
        flags=("-use-reflection",),
        token=True,
    )
    assert code == 0, err
    state = json.loads(out)
    assert [r["deployment_id"] for r in state["resources"]] == [deployment_id]
    assert state["resources"][0]["resource_type"] == "RESOURCE_TYPE_CACHE"


# The protocol itself, through a plain gRPC channel


@pytest.mark.parametrize("path", [V1_PATH, V1ALPHA_PATH], ids=["v1", "v1alpha"])
async def test_both_versions_answer_with_the_files_and_their_comments(channel: grpc.aio.Channel, path: str):
    Request = reflection_pb2.ServerReflectionRequest

    listed, by_method, by_name, unknown, empty = await reflect(
        channel,
        path,
        Request(list_services=""),
        Request(file_containing_symbol="broker.v1.BrokerService.Provision"),
        Request(file_by_filename="broker/v1/broker.proto"),
        Request(file_containing_symbol="broker.v1.NoSuchThing"),
        Request(),
    )

    assert [s.name for s in listed.list_services_response.service] == [
        "broker.v1.BrokerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    # The file asked for comes first, its imports after it.
    files = files_of(by_method)
    assert [f.name for f in files] == [
        "broker/v1/broker.proto",
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
    ]
    assert comment_of_method(files[0], "BrokerService", "Provision").startswith(
        " Provision creates or updates the desired state of one resource"
    )
    assert files[1].source_code_info.location, "the import is served with its comments too"
    assert files_of(by_name) == files
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "broker.v1.NoSuchThing" in unknown.error_response.error_message
    assert unknown.original_request.file_containing_symbol == "broker.v1.NoSuchThing"
    assert empty.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_a_client_with_v1s_own_messages_is_answered(channel: grpc.aio.Channel):
    # v1's descriptor, as v1 serves it, builds message classes a v1-only client would have.
    [answer] = await reflect(
        channel,
        V1_PATH,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    )
    [v1_file] = files_of(answer)
    assert v1_file.name == "grpc/reflection/v1/reflection.proto"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(v1_file)
    v1_request = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    v1_response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    call = channel.stream_stream(
        V1_PATH, request_serializer=v1_request.SerializeToString, response_deserializer=v1_response.FromString
    )

    answers = [
        a
        async for a in call(
            iter([v1_request(file_containing_symbol="broker.v1.ProvisionRequest")]), timeout=10
        )
    ]

    [only] = answers
    assert only.original_request.file_containing_symbol == "broker.v1.ProvisionRequest"
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in only.file_descriptor_response.file_descriptor_proto
    ]
    assert names[0] == "broker/v1/broker.proto"


async def test_the_served_broker_proto_is_the_one_the_stubs_were_built_from(channel: grpc.aio.Channel):
    [answer] = await reflect(
        channel, V1_PATH, reflection_pb2.ServerReflectionRequest(file_by_filename="broker/v1/broker.proto")
    )
    served = files_of(answer)[0]
    served.ClearField("source_code_info")

    assert served == descriptor_pb2.FileDescriptorProto.FromString(broker_pb2.DESCRIPTOR.serialized_pb)


async def test_no_reflection_turns_off_both_versions(broker_without_reflection: RunningBroker):
    async with grpc.aio.insecure_channel(broker_without_reflection.grpc_target) as channel:
        for path in (V1_PATH, V1ALPHA_PATH):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await reflect(channel, path, reflection_pb2.ServerReflectionRequest(list_services=""))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, path


# The servicer's lookups, on descriptors made for the test


def test_v1s_descriptor_is_v1alphas_under_v1s_names():
    v1 = reflection.v1_file()
    v1alpha = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)

    pool = descriptor_pool.DescriptorPool()
    pool.Add(v1)  # every type it names resolves within it
    assert v1.package == "grpc.reflection.v1"
    assert not v1.options.deprecated
    assert [m.name for m in v1.message_type] == [m.name for m in v1alpha.message_type]
    for ours, theirs in zip(v1.message_type, v1alpha.message_type, strict=True):
        assert [(f.name, f.number, f.type, f.label) for f in ours.field] == [
            (f.name, f.number, f.type, f.label) for f in theirs.field
        ]
    method = pool.FindServiceByName("grpc.reflection.v1.ServerReflection").methods_by_name[
        "ServerReflectionInfo"
    ]
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"


def test_extensions_are_found_by_number_and_listed():
    file = descriptor_pb2.FileDescriptorProto(
        name="test/ext.proto",
        package="test",
        dependency=["google/protobuf/descriptor.proto"],
        extension=[
            descriptor_pb2.FieldDescriptorProto(
                name="sensitive",
                number=50001,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                extendee=".google.protobuf.FieldOptions",
            )
        ],
    )
    servicer = reflection.ReflectionServicer(
        services=[], descriptors=reflection.Descriptors([file], fallback=descriptor_pool.Default())
    )
    Request = reflection_pb2.ServerReflectionRequest

    found = servicer.answer(
        Request(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="google.protobuf.FieldOptions", extension_number=50001
            )
        )
    )
    numbers = servicer.answer(Request(all_extension_numbers_of_type="google.protobuf.FieldOptions"))
    missing = servicer.answer(
        Request(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="google.protobuf.FieldOptions", extension_number=50002
            )
        )
    )
    not_a_type = servicer.answer(Request(all_extension_numbers_of_type="test.Nothing"))

    assert [f.name for f in files_of(found)] == ["test/ext.proto", "google/protobuf/descriptor.proto"]
    assert numbers.all_extension_numbers_response.base_type_name == "google.protobuf.FieldOptions"
    assert 50001 in numbers.all_extension_numbers_response.extension_number
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert not_a_type.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
