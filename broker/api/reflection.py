"""gRPC server reflection, ``grpc.reflection.v1`` and ``v1alpha``, answered with the proto comments.

grpc_reflection's own servicer falls short for ``grpcurl describe`` in three ways, which is why this
module exists:

- grpcio-reflection ships only ``grpc.reflection.v1alpha``, which gRPC deprecated for
  ``grpc.reflection.v1``; newer clients ask for v1 first (the grpcurl 1.8.6 of the dev extras still
  speaks only v1alpha). The two protocols' messages are identical apart from the package name, so
  one servicer answers both, v1alpha's message classes doing the (identical) wire encoding; v1's
  own file descriptor is v1alpha's renamed, so that it can be described too.
- It finds files with ``DescriptorPool.FindFileContainingSymbol``, which (in upb) knows neither
  methods nor enum values by the names grpcurl gives them (``State.STATE_PENDING``):
  ``describe broker.v1.BrokerService.Provision`` was "Symbol not found".
- It serves descriptors rebuilt from the ``_pb2`` modules, which carry no ``source_code_info``,
  so no comments.

The broker's files are therefore served from the ``FileDescriptorSet`` that
``scripts/gen_proto.py`` writes next to the stubs (``protoc --include_source_info
--include_imports``), indexed here by every name a client may ask for. Any other file (health,
reflection itself, the ``google.rpc`` error details grpcurl resolves to print an error) is borrowed
from the default pool that the imported ``_pb2`` modules filled, and indexed the same way when first
asked for.
"""

from __future__ import annotations

import collections
import importlib.resources
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)
METHOD = "ServerReflectionInfo"

# Written by scripts/gen_proto.py into the client distribution, beside the stubs it describes.
DESCRIPTOR_SET = ("broker_client.v1", "broker.binpb")

# grpc_reflection ships no type information (no py.typed): its messages are Any to mypy.
Request: TypeAlias = Any
Response: TypeAlias = Any


def _qualify(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def _enum_names(scope: str, enums: Iterable[descriptor_pb2.EnumDescriptorProto]) -> Iterator[str]:
    for enum in enums:
        full = _qualify(scope, enum.name)
        yield full
        for value in enum.value:
            yield _qualify(scope, value.name)  # protobuf's scoping: a value is its enum's sibling
            yield f"{full}.{value.name}"  # how grpcurl (protoreflect) names it


def _message_names(scope: str, messages: Iterable[descriptor_pb2.DescriptorProto]) -> Iterator[str]:
    for message in messages:
        full = _qualify(scope, message.name)
        yield full
        for field in (*message.field, *message.extension):
            yield f"{full}.{field.name}"
        for oneof in message.oneof_decl:
            yield f"{full}.{oneof.name}"
        yield from _enum_names(full, message.enum_type)
        yield from _message_names(full, message.nested_type)


def names_defined(file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    """Every fully qualified name ``file`` defines, methods, fields and enum values included."""
    yield from _message_names(file.package, file.message_type)
    yield from _enum_names(file.package, file.enum_type)
    for extension in file.extension:
        yield _qualify(file.package, extension.name)
    for service in file.service:
        full = _qualify(file.package, service.name)
        yield full
        for method in service.method:
            yield f"{full}.{method.name}"


def extensions_defined(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, int]]:
    """``(extended message, field number)`` of every extension ``file`` declares, at any depth."""
    pending: list[Iterable[descriptor_pb2.FieldDescriptorProto]] = [file.extension]
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        pending.append(message.extension)
        messages.extend(message.nested_type)
    for extensions in pending:
        for extension in extensions:
            yield extension.extendee.lstrip("."), extension.number


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``, which grpcio-reflection does not ship: v1alpha's
    file under v1's names and options, since the two protocols differ in nothing else."""
    file = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old, new = f".{file.package}.", ".grpc.reflection.v1."
    file.name = "grpc/reflection/v1/reflection.proto"
    file.package = "grpc.reflection.v1"
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    file.options.ClearField("deprecated")  # v1alpha is; v1 is its replacement

    def renamed(type_name: str) -> str:
        return new + type_name.removeprefix(old) if type_name.startswith(old) else type_name

    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # assigning even "" would give a scalar a type name
                field.type_name = renamed(field.type_name)
    for service in file.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    return file


def load_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The broker's protos and their imports, with comments, as scripts/gen_proto.py wrote them."""
    package, name = DESCRIPTOR_SET
    data = importlib.resources.files(package).joinpath(name).read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


class Descriptors:
    """File descriptors by file name and by every symbol they define, for reflection answers.

    ``files`` are served as given (with their comments) and win over same-named files of
    ``fallback``, from which anything else is borrowed on first use. Misses are not remembered: a
    module imported later may add the file to the pool.
    """

    def __init__(
        self, files: Iterable[descriptor_pb2.FileDescriptorProto], *, fallback: descriptor_pool.DescriptorPool
    ) -> None:
        self._fallback = fallback
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._serialized: dict[str, bytes] = {}
        self._symbols: dict[str, str] = {}
        self._extensions: dict[str, dict[int, str]] = collections.defaultdict(dict)
        for file in files:
            self._add(file)

    @classmethod
    def default(cls) -> Descriptors:
        """The broker's descriptor set and reflection v1, over the default pool."""
        return cls([*load_descriptor_set().file, v1_file()], fallback=descriptor_pool.Default())

    def _add(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        if file.name in self._files:
            return
        self._files[file.name] = file
        self._serialized[file.name] = file.SerializeToString()
        for symbol in names_defined(file):
            self._symbols.setdefault(symbol, file.name)
        for extendee, number in extensions_defined(file):
            self._extensions[extendee].setdefault(number, file.name)

    def _borrow(self, name: str) -> bool:
        """Index the fallback pool's file ``name``; False if the pool has no such file."""
        if name in self._files:
            return True
        try:
            found = self._fallback.FindFileByName(name)
        except KeyError:
            return False
        file = descriptor_pb2.FileDescriptorProto()
        found.CopyToProto(file)
        self._add(file)
        return True

    def _borrow_symbol(self, symbol: str) -> None:
        # The pool finds neither ``Service.Method`` nor ``Enum.VALUE``, but their parent's file, which
        # the index then searches for the full name.
        name = symbol
        while name:
            try:
                self._borrow(self._fallback.FindFileContainingSymbol(name).name)
                return
            except KeyError:
                name = name.rpartition(".")[0]

    def with_dependencies(self, name: str) -> list[bytes]:
        """File ``name`` (first, as clients expect) and every file it imports, directly or not,
        serialized; KeyError if it, or one of its imports, is unknown."""
        order: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop(0)
            if current in order:
                continue
            if not self._borrow(current):
                raise KeyError(current)
            order.append(current)
            pending.extend(self._files[current].dependency)
        return [self._serialized[n] for n in order]

    def file_defining(self, symbol: str) -> str:
        """The name of the file that defines the fully qualified ``symbol``; KeyError if none."""
        symbol = symbol.lstrip(".")
        if symbol not in self._symbols:
            self._borrow_symbol(symbol)
        return self._symbols[symbol]

    def _extension_numbers(self, extendee: str) -> dict[int, str]:
        extendee = extendee.lstrip(".")
        try:
            message = self._fallback.FindMessageTypeByName(extendee)
        except KeyError:
            pass
        else:
            self._borrow(message.file.name)
            for extension in self._fallback.FindAllExtensions(message):
                self._borrow(self._fallback.FindFileContainingSymbol(extension.full_name).name)
        if extendee not in self._symbols:
            raise KeyError(extendee)
        return self._extensions.get(extendee, {})

    def file_extending(self, extendee: str, number: int) -> str:
        """The name of the file declaring extension ``number`` of message ``extendee``; KeyError if none."""
        return self._extension_numbers(extendee)[number]

    def extension_numbers(self, extendee: str) -> list[int]:
        """The numbers of every known extension of message ``extendee``; KeyError if no such message."""
        return sorted(self._extension_numbers(extendee))


def _error(request: Request, code: grpc.StatusCode, message: str) -> Response:
    return reflection_pb2.ServerReflectionResponse(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=code.value[0], error_message=message),
    )


class ReflectionServicer:
    """``ServerReflectionInfo`` for v1 and v1alpha alike: one answer per request on the stream."""

    def __init__(self, *, services: Iterable[str], descriptors: Descriptors) -> None:
        self._services = sorted(set(services))
        self._descriptors = descriptors

    def answer(self, request: Request) -> Response:
        """The response to one reflection request (errors are responses too, as the protocol says)."""
        descriptors = self._descriptors
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            return reflection_pb2.ServerReflectionResponse(
                original_request=request,
                list_services_response=reflection_pb2.ListServiceResponse(
                    service=[reflection_pb2.ServiceResponse(name=name) for name in self._services]
                ),
            )
        if kind == "all_extension_numbers_of_type":
            extendee = request.all_extension_numbers_of_type.lstrip(".")
            try:
                numbers = descriptors.extension_numbers(extendee)
            except KeyError:
                return _error(request, grpc.StatusCode.NOT_FOUND, f"no message type {extendee}")
            return reflection_pb2.ServerReflectionResponse(
                original_request=request,
                all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                    base_type_name=extendee, extension_number=numbers
                ),
            )
        try:
            if kind == "file_by_filename":
                missing = f"no file {request.file_by_filename}"
                name = request.file_by_filename
            elif kind == "file_containing_symbol":
                missing = f"no symbol {request.file_containing_symbol}"
                name = descriptors.file_defining(request.file_containing_symbol)
            elif kind == "file_containing_extension":
                wanted = request.file_containing_extension
                missing = f"no extension {wanted.extension_number} of {wanted.containing_type}"
                name = descriptors.file_extending(wanted.containing_type, wanted.extension_number)
            else:
                return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "the request asks for nothing")
            files = descriptors.with_dependencies(name)
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, missing)
        return reflection_pb2.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=files),
        )

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        """Answer each request of the stream in turn."""
        async for request in requests:
            yield self.answer(request)


def enable(server: grpc.aio.Server, *, services: Iterable[str]) -> None:
    """Serve reflection v1 and v1alpha on ``server``, listing ``services`` and reflection itself."""
    servicer = ReflectionServicer(services=[*services, *SERVICE_NAMES], descriptors=Descriptors.default())
    handlers = {
        METHOD: grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for service in SERVICE_NAMES:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)
