"""Regenerate the Python stubs from proto/ into the client distribution.

protoc names Python modules after the .proto path, so ``broker/v1/broker.proto`` would become the
module ``broker.v1.broker_pb2`` and collide with the server package ``broker``. The stubs are
therefore generated into a scratch directory and moved to ``broker_client/v1``, and the few lines of
Python that name the module (imports and the module name handed to the protobuf builder) are
rewritten. The serialized descriptor is left alone: the proto package stays ``broker.v1`` on the
wire and in reflection.

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

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
TARGET = ROOT / "clients" / "python" / "src" / "broker_client" / "v1"
PROTO_PACKAGE_DIR = pathlib.Path("broker") / "v1"
INIT = (
    '"""Generated gRPC stubs and messages of the broker.v1 API (do not edit; run scripts/gen_proto.py)."""\n'
)

_REWRITES = (
    (re.compile(r"^from broker\.v1 import ", re.MULTILINE), "from broker_client.v1 import "),
    (re.compile(r"^import broker\.v1\.(\w+)", re.MULTILINE), r"import broker_client.v1.\1"),
    (re.compile(r"'broker\.v1\.(\w+_pb2)'"), r"'broker_client.v1.\1'"),
    (re.compile(r"\bbroker\.v1\.(\w+_pb2)\b(?!')"), r"broker_client.v1.\1"),
)


def _generate(out: pathlib.Path) -> None:
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
        *protos,
    ]
    subprocess.run(cmd, check=True)


def _render() -> dict[str, str]:
    """Generate into a scratch directory and return the final file contents by file name."""
    with tempfile.TemporaryDirectory() as scratch:
        out = pathlib.Path(scratch)
        _generate(out)
        files = {"__init__.py": INIT}
        for path in sorted((out / PROTO_PACKAGE_DIR).iterdir()):
            text = path.read_text()
            for pattern, replacement in _REWRITES:
                if path.suffix in (".py", ".pyi"):
                    text = pattern.sub(replacement, text)
            files[path.name] = text
        return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args()
    files = _render()
    if args.check:
        current = {p.name: p.read_text() for p in TARGET.glob("*.py*")} if TARGET.exists() else {}
        if current != files:
            stale = sorted(set(current) ^ set(files) | {n for n in files if current.get(n) != files[n]})
            print(f"generated stubs are stale: {', '.join(stale)}; run: python scripts/gen_proto.py")
            return 1
        print("generated stubs are up to date")
        return 0
    if TARGET.exists():
        shutil.rmtree(TARGET)
    TARGET.mkdir(parents=True)
    for name, text in files.items():
        (TARGET / name).write_text(text)
    print(f"wrote {len(files)} files to {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
