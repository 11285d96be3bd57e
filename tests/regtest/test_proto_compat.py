"""protos/ must stay a wire-compatible subset of LND's own .proto definitions.

Both our protos and LND's originals (from the LND source module given by the
``lnd_source_dir`` fixture) are compiled to FileDescriptorSets; every message, enum and
service we declare must exist in LND's with identical field numbers, names, types, labels
and type names (plus oneof membership and the deprecated/jstype options), identical enum
values, and identical RPC signatures. tests/unit/test_proto_compat_check.py makes sure
this comparison actually reports mismatches.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf import descriptor_pb2

pytestmark = pytest.mark.regtest

REPO_ROOT = Path(__file__).resolve().parents[2]
OUR_PROTO_DIR = REPO_ROOT / "protos"

# LND's protos, relative to <lnd module>/lnrpc (the include root their imports assume:
# invoicesrpc/invoices.proto and routerrpc/router.proto `import "lightning.proto"`).
LND_PROTO_FILES = (
    "lightning.proto",
    "stateservice.proto",
    "invoicesrpc/invoices.proto",
    "routerrpc/router.proto",
)

EXPECTED_SERVICES = {
    ".lnrpc.Lightning",
    ".lnrpc.State",
    ".invoicesrpc.Invoices",
    ".routerrpc.Router",
}

FieldDescriptorProto = descriptor_pb2.FieldDescriptorProto

_D = TypeVar("_D")


def well_known_include_dir() -> Path:
    """grpc_tools' bundled google/protobuf/*.proto, for protos importing well-known types."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def build_descriptor_set(
    include_dirs: Sequence[Path], files: Sequence[str], out_file: Path
) -> descriptor_pb2.FileDescriptorSet:
    """Compile ``files`` (relative to an include dir) into a FileDescriptorSet with imports."""
    # Imported dynamically: grpc_tools ships no type information.
    protoc = importlib.import_module("grpc_tools.protoc")
    args = [
        "grpc_tools.protoc",
        *(f"-I{d}" for d in include_dirs),
        f"-I{well_known_include_dir()}",
        f"--descriptor_set_out={out_file}",
        "--include_imports",
        *files,
    ]
    status: int = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed ({status}) compiling {list(files)}; see stderr")
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out_file.read_bytes())
    return fds


def our_descriptor_set(tmp_dir: Path) -> descriptor_pb2.FileDescriptorSet:
    files = sorted(p.name for p in OUR_PROTO_DIR.glob("*.proto"))
    return build_descriptor_set([OUR_PROTO_DIR], files, tmp_dir / "ours.binpb")


def lnd_lnrpc_dir(lnd_source_dir: Path) -> Path:
    """The lnrpc/ dir of an LND source module (accepts the lnrpc dir itself, too)."""
    for candidate in (lnd_source_dir / "lnrpc", lnd_source_dir):
        if (candidate / "lightning.proto").is_file():
            return candidate
    raise FileNotFoundError(f"no lnrpc/lightning.proto under {lnd_source_dir}")


def lnd_descriptor_set(lnd_source_dir: Path, tmp_dir: Path) -> descriptor_pb2.FileDescriptorSet:
    lnrpc = lnd_lnrpc_dir(lnd_source_dir)
    return build_descriptor_set([lnrpc], LND_PROTO_FILES, tmp_dir / "lnd.binpb")


@dataclass
class DescriptorIndex:
    """Messages, enums and services of a FileDescriptorSet, keyed by full name (".pkg.Name")."""

    messages: dict[str, descriptor_pb2.DescriptorProto] = field(default_factory=dict)
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = field(default_factory=dict)
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = field(default_factory=dict)

    @classmethod
    def of(cls, fds: descriptor_pb2.FileDescriptorSet) -> DescriptorIndex:
        index = cls()
        for file in fds.file:
            prefix = f".{file.package}." if file.package else "."
            index._add(prefix, file.message_type, file.enum_type)
            for service in file.service:
                index.services[prefix + service.name] = service
        return index

    def _add(
        self,
        prefix: str,
        messages: Sequence[descriptor_pb2.DescriptorProto],
        enums: Sequence[descriptor_pb2.EnumDescriptorProto],
    ) -> None:
        for enum in enums:
            self.enums[prefix + enum.name] = enum
        for message in messages:
            name = prefix + message.name
            self.messages[name] = message
            self._add(name + ".", message.nested_type, message.enum_type)


def _field_signature(
    message: descriptor_pb2.DescriptorProto, fld: FieldDescriptorProto
) -> dict[str, object]:
    oneof = message.oneof_decl[fld.oneof_index].name if fld.HasField("oneof_index") else None
    return {
        "name": fld.name,
        "type": FieldDescriptorProto.Type.Name(fld.type),
        "label": FieldDescriptorProto.Label.Name(fld.label),
        # protoc resolves type names to full names (".lnrpc.Invoice") in descriptor sets.
        "type_name": fld.type_name,
        "oneof": oneof,
        "proto3_optional": fld.proto3_optional,
        "deprecated": fld.options.deprecated,
        "jstype": descriptor_pb2.FieldOptions.JSType.Name(fld.options.jstype),
    }


def _compare_message(
    name: str, ours: descriptor_pb2.DescriptorProto, theirs: descriptor_pb2.DescriptorProto
) -> list[str]:
    problems: list[str] = []
    their_fields = {f.number: f for f in theirs.field}
    for fld in ours.field:
        other = their_fields.get(fld.number)
        if other is None:
            problems.append(f"{name}.{fld.name}: field number {fld.number} not in LND")
            continue
        mine = _field_signature(ours, fld)
        lnd = _field_signature(theirs, other)
        for key, value in mine.items():
            if value != lnd[key]:
                problems.append(
                    f"{name}.{fld.name} (#{fld.number}): {key} is {value!r}, LND has {lnd[key]!r}"
                )
    return problems


def _compare_enum(
    name: str, ours: descriptor_pb2.EnumDescriptorProto, theirs: descriptor_pb2.EnumDescriptorProto
) -> list[str]:
    mine = {v.name: v.number for v in ours.value}
    lnd = {v.name: v.number for v in theirs.value}
    if mine == lnd:
        return []
    return [f"{name}: enum values {mine} differ from LND's {lnd}"]


def _compare_service(
    name: str,
    ours: descriptor_pb2.ServiceDescriptorProto,
    theirs: descriptor_pb2.ServiceDescriptorProto,
) -> list[str]:
    problems: list[str] = []
    their_methods = {m.name: m for m in theirs.method}
    for method in ours.method:
        other = their_methods.get(method.name)
        if other is None:
            problems.append(f"{name}.{method.name}: RPC not in LND")
            continue
        for attr in ("input_type", "output_type", "client_streaming", "server_streaming"):
            mine, lnd = getattr(method, attr), getattr(other, attr)
            if mine != lnd:
                problems.append(f"{name}.{method.name}: {attr} is {mine!r}, LND has {lnd!r}")
    return problems


def _compare_all(
    kind: str,
    ours: dict[str, _D],
    theirs: dict[str, _D],
    compare: Callable[[str, _D, _D], list[str]],
) -> list[str]:
    problems: list[str] = []
    for name, item in sorted(ours.items()):
        other = theirs.get(name)
        if other is None:
            problems.append(f"{name}: {kind} not in LND")
        else:
            problems.extend(compare(name, item, other))
    return problems


def compare_descriptor_sets(
    ours: descriptor_pb2.FileDescriptorSet, theirs: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    """Every way in which ``ours`` is not a compatible subset of ``theirs`` (empty if none)."""
    mine, lnd = DescriptorIndex.of(ours), DescriptorIndex.of(theirs)
    return [
        *_compare_all("message", mine.messages, lnd.messages, _compare_message),
        *_compare_all("enum", mine.enums, lnd.enums, _compare_enum),
        *_compare_all("service", mine.services, lnd.services, _compare_service),
    ]


def test_our_protos_are_a_wire_compatible_subset_of_lnd(
    lnd_source_dir: Path, tmp_path: Path
) -> None:
    ours = our_descriptor_set(tmp_path)
    lnd = lnd_descriptor_set(lnd_source_dir, tmp_path)

    assert set(DescriptorIndex.of(ours).services) == EXPECTED_SERVICES
    problems = compare_descriptor_sets(ours, lnd)
    assert not problems, "protos/ diverge from LND:\n" + "\n".join(problems)
