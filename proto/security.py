"""Authentication on the wire, shared by agents and the controller.

A fleet token travels as `authorization: Bearer TOKEN` call metadata; a server with a token
answers every call without it UNAUTHENTICATED. Optional mutual TLS: the server presents its
certificate and requires a client certificate signed by the fleet CA, and clients do the
same the other way round.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from proto.adapter import BEARER

MAX_MESSAGE_BYTES = 64 * 2 ** 20   # hidden states of a long prompt, logits of a big vocabulary
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                                    ("grpc.so_reuseport", 0)]


@dataclass(frozen=True)
class Security:
    token: str = ""          # fleet token ("" = no token check)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    def __post_init__(self):
        given = [p for p in (self.tls_cert, self.tls_key, self.tls_ca) if p is not None]
        if given and len(given) != 3:
            raise ValueError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        for p in given:
            if not Path(p).is_file():
                raise ValueError(f"TLS file {p} does not exist")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((BEARER, f"Bearer {self.token}"),) if self.token else ()

    def _read(self):
        return Path(self.tls_ca).read_bytes(), Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes()

    def channel(self, address: str) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        ca, key, cert = self._read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)

    def bind(self, server: grpc.Server, address: str) -> int:
        """Listen on address; returns the port (address may end in :0)."""
        if not self.tls:
            port = server.add_insecure_port(address)
        else:
            ca, key, cert = self._read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
            port = server.add_secure_port(address, creds)
        if port == 0:
            raise ValueError(f"cannot listen on {address}; is the port in use or the host wrong?")
        return port

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []


def _deny(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                  "missing or wrong fleet token; pass the fleet's --token (authorization: Bearer ...)")


class TokenCheck(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata).get(BEARER, "")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny)
        return grpc.unary_unary_rpc_method_handler(_deny)
