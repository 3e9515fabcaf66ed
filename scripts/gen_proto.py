"""Regenerate the Python stubs from proto/ into the client distribution.

protoc names Python modules after the .proto path, so ``broker/v1/broker.proto`` would become the
module ``broker.v1.broker_pb2`` and collide with the server package ``broker``. The stubs are
therefore generated into a scratch directory and moved to ``broker_client/v1``, and the few lines of
Python that name the module (imports and the module name handed to the protobuf builder) are
rewritten. The serialized descriptor is left alone: the proto package stays ``broker.v1`` on the
wire and in reflection.

Beside the stubs it writes ``broker.binpb``, a ``FileDescriptorSet`` of the same protos and their
imports *with* ``source_code_info``: the serialized descriptors inside the ``_pb2`` modules carry no
comments, and the server's reflection (``broker.api.reflection``) serves this set so that
``grpcurl describe`` shows them. It is package data of the client distribution, next to the modules
it describes, and ``--check`` compares it like the stubs. protoc fills in every field's
``json_name``; the set leaves it out where it is the default, as the ``_pb2`` modules' descriptors
do, because grpcurl prints JSON with a descriptor's json_name when it has one, and its output keeps
the proto field names that the /v1 gateway uses too.

Usage: ``python scripts/gen_proto.py`` (write) or ``python scripts/gen_proto.py --check`` (exit 1 if
the committed stubs differ from freshly generated ones).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
TARGET = ROOT / "clients" / "python" / "src" / "broker_client" / "v1"
PROTO_PACKAGE_DIR = pathlib.Path("broker") / "v1"
DESCRIPTOR_SET = "broker.binpb"
INIT = (
    '"""Generated gRPC stubs and messages of the broker.v1 API, and its descriptor set with comments\n'
    f'({DESCRIPTOR_SET}) for server reflection (do not edit; run scripts/gen_proto.py)."""\n'
)

_REWRITES = (
    (re.compile(r"^from broker\.v1 import ", re.MULTILINE), "from broker_client.v1 import "),
    (re.compile(r"^import broker\.v1\.(\w+)", re.MULTILINE), r"import broker_client.v1.\1"),
    (re.compile(r"'broker\.v1\.(\w+_pb2)'"), r"'broker_client.v1.\1'"),
    (re.compile(r"\bbroker\.v1\.(\w+_pb2)\b(?!')"), r"broker_client.v1.\1"),
)


def _generate(out: pathlib.Path, descriptor_set: pathlib.Path) -> None:
    scripts = pathlib.Path(sysconfig.get_path("scripts"))
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        "--include_source_info",
        "--include_imports",
        f"--descriptor_set_out={descriptor_set}",
        *protos,
    ]
    subprocess.run(cmd, check=True)


def _default_json_name(name: str) -> str:
    """protoc's json_name for a field that sets none: underscores dropped, the letter after each one
    in upper case (``retention_ms`` is ``retentionMs``)."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def _without_default_json_names(data: bytes) -> bytes:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    for file in descriptor_set.file:
        fields = list(file.extension)
        messages = list(file.message_type)
        while messages:
            message = messages.pop()
            fields += [*message.field, *message.extension]
            messages += message.nested_type
        for field in fields:
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")
    return descriptor_set.SerializeToString(deterministic=True)


def _render() -> dict[str, bytes]:
    """Generate into a scratch directory and return the final file contents by file name."""
    with tempfile.TemporaryDirectory() as scratch:
        out = pathlib.Path(scratch) / "out"
        out.mkdir()
        # Outside ``out``: protoc names it, not the proto path, so it needs no rewriting.
        descriptor_set = pathlib.Path(scratch) / DESCRIPTOR_SET
        _generate(out, descriptor_set)
        files = {"__init__.py": INIT.encode()}
        for path in sorted((out / PROTO_PACKAGE_DIR).iterdir()):
            text = path.read_text()
            for pattern, replacement in _REWRITES:
                if path.suffix in (".py", ".pyi"):
                    text = pattern.sub(replacement, text)
            files[path.name] = text.encode()
        files[DESCRIPTOR_SET] = _without_default_json_names(descriptor_set.read_bytes())
        return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args()
    files = _render()
    if args.check:
        # Every file, not only *.py: writing replaces the directory, so anything else there is stale too.
        current = {p.name: p.read_bytes() for p in TARGET.iterdir() if p.is_file()} if TARGET.exists() else {}
        if current != files:
            stale = sorted(set(current) ^ set(files) | {n for n in files if current.get(n) != files[n]})
            print(f"generated stubs are stale: {', '.join(stale)}; run: python scripts/gen_proto.py")
            return 1
        print("generated stubs are up to date")
        return 0
    if TARGET.exists():
        shutil.rmtree(TARGET)
    TARGET.mkdir(parents=True)
    for name, content in files.items():
        (TARGET / name).write_bytes(content)
    print(f"wrote {len(files)} files to {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
