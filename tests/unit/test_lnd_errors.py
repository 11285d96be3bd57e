"""gRPC errors from LND map onto the gateway's exception tree."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from gateway import errors
from gateway.lnd.client import map_rpc_error
from gateway.lnd.connection import LndSettings


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect", errors.BackendUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", errors.BackendUnavailable),
        (grpc.StatusCode.PERMISSION_DENIED, "no", errors.BackendPermissionDenied),
        (
            grpc.StatusCode.UNKNOWN,
            "verification failed: signature mismatch after caveat verification",
            errors.BackendPermissionDenied,
        ),
        (grpc.StatusCode.UNKNOWN, "permission denied", errors.BackendPermissionDenied),
        (grpc.StatusCode.NOT_FOUND, "there are no existing invoices", errors.InvoiceNotFound),
        (grpc.StatusCode.UNKNOWN, "unable to locate invoice", errors.InvoiceNotFound),
        (
            grpc.StatusCode.UNKNOWN,
            "invoice with payment hash already exists",
            errors.InvoiceAlreadyExists,
        ),
        (
            grpc.StatusCode.UNKNOWN,
            "server is still in the process of starting",
            errors.BackendUnavailable,
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad amount", errors.BackendBadRequest),
        (grpc.StatusCode.UNKNOWN, "Stream removed", errors.BackendUnavailable),
        (
            grpc.StatusCode.INTERNAL,
            "Received RST_STREAM with error code 2",
            errors.BackendUnavailable,
        ),
        (grpc.StatusCode.CANCELLED, "cancelled by the proxy", errors.BackendUnavailable),
        (grpc.StatusCode.UNKNOWN, "self-payments not allowed", errors.BackendBadRequest),
        (
            grpc.StatusCode.UNKNOWN,
            "invoice expired. Valid until 2026-11-26 12:00:00 +0000 UTC",
            errors.BackendBadRequest,
        ),
        (
            grpc.StatusCode.UNKNOWN,
            "payment request must contain either a payment address or blinded paths",
            errors.BackendBadRequest,
        ),
        (grpc.StatusCode.UNKNOWN, "invalid index: bech32", errors.BackendBadRequest),
        # CancelInvoice of a settled invoice; SettleInvoice of a settled or cancelled one
        (grpc.StatusCode.UNKNOWN, "invoice already settled", errors.InvoiceAlreadySettled),
        (grpc.StatusCode.UNKNOWN, "invoice already canceled", errors.InvoiceAlreadyCanceled),
        (grpc.StatusCode.UNKNOWN, "something else entirely", errors.BackendError),
    ],
)
def test_mapping(code: grpc.StatusCode, details: str, expected: type[Exception]) -> None:
    mapped = map_rpc_error(_rpc_error(code, details), "127.0.0.1:10009")
    assert type(mapped) is expected
    assert "127.0.0.1:10009" in str(mapped)
    assert details in str(mapped)


def test_settled_and_cancelled_refusals_are_still_bad_requests() -> None:
    """Callers that catch ``BackendBadRequest`` (a definite refusal) still catch them."""
    assert issubclass(errors.InvoiceAlreadySettled, errors.BackendBadRequest)
    assert issubclass(errors.InvoiceAlreadyCanceled, errors.BackendBadRequest)
    assert not issubclass(errors.InvoiceAlreadySettled, errors.InvoiceAlreadyCanceled)


def test_every_mapped_error_is_a_gateway_error() -> None:
    mapped = map_rpc_error(_rpc_error(grpc.StatusCode.INTERNAL, "boom"), "h:1")
    assert isinstance(mapped, errors.GatewayError)


def test_settings_read_macaroon_from_file_or_hex(tmp_path: Path) -> None:
    cert = tmp_path / "tls.cert"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nCERT")
    macaroon = tmp_path / "m.macaroon"
    macaroon.write_bytes(b"\x02\x01mac")
    from_file = LndSettings.from_files("h:1", cert, macaroon_path=macaroon)
    from_hex = LndSettings.from_files("h:1", cert, macaroon_hex="02016d6163")
    assert from_file == from_hex
    assert "mac" not in repr(from_file)
    assert "CERT" not in repr(from_file)
    with pytest.raises(ValueError, match="exactly one"):
        LndSettings.from_files("h:1", cert)
    with pytest.raises(ValueError, match="not valid hex"):
        LndSettings.from_files("h:1", cert, macaroon_hex="zz")


def test_settings_refuse_a_swapped_or_non_pem_certificate(tmp_path: Path) -> None:
    cert = tmp_path / "tls.cert"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    macaroon = tmp_path / "gateway.macaroon"
    macaroon.write_bytes(b"\x02\x01mac")
    with pytest.raises(ValueError, match="not a PEM certificate"):
        LndSettings.from_files("h:1", macaroon, macaroon_path=macaroon)
    with pytest.raises(ValueError, match="swapped with tls_cert"):
        LndSettings.from_files("h:1", cert, macaroon_path=cert)
    with pytest.raises(ValueError, match="macaroon is empty"):
        LndSettings.from_files("h:1", cert, macaroon_hex="")
