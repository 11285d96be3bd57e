"""Self-check for the LND proto compatibility comparison in tests/regtest/test_proto_compat.py.

The regtest check only proves something if the comparison can fail, so feed it our own
descriptor set with deliberate incompatibilities and make sure each one is reported.
No LND sources are needed here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

COMPAT_MODULE = Path(__file__).resolve().parents[1] / "regtest" / "test_proto_compat.py"


def _load_compat() -> ModuleType:
    # Loaded by path (tests/ is not a package); gives us its helpers, not its regtest marker.
    spec = importlib.util.spec_from_file_location("_proto_compat_under_test", COMPAT_MODULE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


compat = _load_compat()


@pytest.fixture
def ours(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    fds: descriptor_pb2.FileDescriptorSet = compat.our_descriptor_set(tmp_path)
    return fds


def _problems(
    altered: descriptor_pb2.FileDescriptorSet, reference: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    problems: list[str] = compat.compare_descriptor_sets(altered, reference)
    return problems


def _file(fds: descriptor_pb2.FileDescriptorSet, name: str) -> descriptor_pb2.FileDescriptorProto:
    return next(f for f in fds.file if f.name == name)


def _message(fds: descriptor_pb2.FileDescriptorSet, name: str) -> descriptor_pb2.DescriptorProto:
    return next(m for m in _file(fds, "lightning.proto").message_type if m.name == name)


def _field(
    message: descriptor_pb2.DescriptorProto, name: str
) -> descriptor_pb2.FieldDescriptorProto:
    return next(f for f in message.field if f.name == name)


def _copy(fds: descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.FileDescriptorSet:
    altered = descriptor_pb2.FileDescriptorSet()
    altered.CopyFrom(fds)
    return altered


def test_identical_sets_have_no_problems(ours: descriptor_pb2.FileDescriptorSet) -> None:
    index = compat.DescriptorIndex.of(ours)
    assert set(index.services) == compat.EXPECTED_SERVICES
    assert ".lnrpc.Invoice.InvoiceState" in index.enums
    assert _problems(ours, ours) == []


def test_detects_changed_field_number(ours: descriptor_pb2.FileDescriptorSet) -> None:
    altered = _copy(ours)
    _field(_message(altered, "Invoice"), "value_msat").number = 99
    assert _problems(altered, ours) == [".lnrpc.Invoice.value_msat: field number 99 not in LND"]


def test_detects_changed_field_name_type_and_label(
    ours: descriptor_pb2.FileDescriptorSet,
) -> None:
    altered = _copy(ours)
    invoice = _message(altered, "Invoice")
    _field(invoice, "memo").name = "memo2"
    _field(invoice, "value").type = descriptor_pb2.FieldDescriptorProto.TYPE_UINT64
    _field(invoice, "r_hash").label = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    problems = _problems(altered, ours)
    assert len(problems) == 3
    assert any("Invoice.memo2 (#1): name" in p for p in problems)
    assert any("Invoice.value (#5): type" in p for p in problems)
    assert any("Invoice.r_hash (#4): label" in p for p in problems)


def test_detects_changed_type_name(ours: descriptor_pb2.FileDescriptorSet) -> None:
    altered = _copy(ours)
    _field(_message(altered, "ChannelEdge"), "node1_policy").type_name = ".lnrpc.Channel"
    assert _problems(altered, ours) == [
        ".lnrpc.ChannelEdge.node1_policy (#7): type_name is '.lnrpc.Channel', "
        "LND has '.lnrpc.RoutingPolicy'"
    ]


def test_detects_lost_option(ours: descriptor_pb2.FileDescriptorSet) -> None:
    altered = _copy(ours)
    _field(_message(altered, "Hop"), "chan_id").ClearField("options")
    problems = _problems(altered, ours)
    assert problems == [".lnrpc.Hop.chan_id (#1): jstype is 'JS_NORMAL', LND has 'JS_STRING'"]


def test_detects_enum_value_changes(ours: descriptor_pb2.FileDescriptorSet) -> None:
    altered = _copy(ours)
    state = next(e for e in _message(altered, "Invoice").enum_type if e.name == "InvoiceState")
    state.value[-1].number = 7
    wallet_state = _file(altered, "stateservice.proto").enum_type[0]
    del wallet_state.value[-1]
    problems = _problems(altered, ours)
    assert len(problems) == 2
    assert problems[0].startswith(".lnrpc.Invoice.InvoiceState: enum values")
    assert problems[1].startswith(".lnrpc.WalletState: enum values")


def test_detects_rpc_changes(ours: descriptor_pb2.FileDescriptorSet) -> None:
    altered = _copy(ours)
    router = _file(altered, "router.proto").service[0]
    send = next(m for m in router.method if m.name == "SendPaymentV2")
    send.server_streaming = False
    track = next(m for m in router.method if m.name == "TrackPaymentV2")
    track.output_type = ".lnrpc.Invoice"
    router.method.add(name="SendPayment", input_type=send.input_type, output_type=".lnrpc.Payment")
    assert _problems(altered, ours) == [
        ".routerrpc.Router.SendPaymentV2: server_streaming is False, LND has True",
        ".routerrpc.Router.TrackPaymentV2: output_type is '.lnrpc.Invoice', "
        "LND has '.lnrpc.Payment'",
        ".routerrpc.Router.SendPayment: RPC not in LND",
    ]


def test_detects_unknown_message_enum_and_service(ours: descriptor_pb2.FileDescriptorSet) -> None:
    altered = _copy(ours)
    lightning = _file(altered, "lightning.proto")
    lightning.message_type.add(name="Bogus")
    lightning.enum_type.add(name="BogusEnum").value.add(name="ZERO", number=0)
    lightning.service.add(name="BogusService")
    assert _problems(altered, ours) == [
        ".lnrpc.Bogus: message not in LND",
        ".lnrpc.BogusEnum: enum not in LND",
        ".lnrpc.BogusService: service not in LND",
    ]
