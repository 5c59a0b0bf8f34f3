"""One connection to a bootstrap server, made as the clients will make it, before they start.

kafka-python retries a failed bootstrap until `bootstrap_timeout_ms` (30 s) and then says
only "Unable to bootstrap from ...": a wrong password, a certificate the client does not
trust, or a client speaking plaintext to a TLS listener (or the reverse) all look the same,
and late. `check_connection` tries once, within seconds, and raises a `UserError` naming the
cause:

- TLS (`SSL`, `SASL_SSL`): the handshake, with the context kafka-python builds from the same
  options (`ssl_cafile`, `ssl_certfile`, `ssl_keyfile`, host name checked);
- plaintext (`PLAINTEXT`, `SASL_PLAINTEXT`): an ApiVersions request; a TLS alert in reply
  (or a TLS handshake that succeeds) means the listener expects TLS;
- SASL with PLAIN or SCRAM: the handshake and authentication, through kafka-python's own
  protocol encoder and SASL mechanisms (other mechanisms are left to the clients).

When no bootstrap server accepts a connection, or a reply is not understood, it decides
nothing and returns: the clients then wait for the broker as they always did.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

from kafka.errors import KafkaError
from kafka.net.sasl import get_sasl_mechanism
from kafka.protocol.metadata import ApiVersionsRequest
from kafka.protocol.parser import KafkaProtocol
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

from pipeline.errors import UserError

log = logging.getLogger(__name__)

_TLS_RECORD_TYPES = (0x15, 0x16)  # alert, handshake: what a TLS listener answers with
_PROBED_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class _Undecided(Exception):
    """This server gave no verdict (unreachable, or a reply not understood)."""


def check_connection(
    bootstrap_servers: str | list[str], security: Mapping[str, Any], timeout_s: float = 5.0
) -> None:
    """Connect to the first bootstrap server that accepts a connection as `security`
    (kafka-python options, `pipeline.kafka.config.security_config`) says; raise UserError
    when TLS or SASL fails there, return otherwise."""
    servers = (
        bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else bootstrap_servers
    )
    deadline = time.monotonic() + timeout_s
    for server in servers:
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            continue  # kafka-python reports malformed addresses itself
        try:
            _probe(host.strip("[]"), int(port), security, deadline)
            return
        except _Undecided as why:
            log.debug("connection check of %s: %s", server, why)
        if time.monotonic() >= deadline:
            return


def _probe(host: str, port: int, security: Mapping[str, Any], deadline: float) -> None:
    protocol = str(security.get("security_protocol", "PLAINTEXT")).upper()
    where = f"{host}:{port}"
    sock = _connect(host, port, deadline)
    try:
        if protocol in ("SSL", "SASL_SSL"):
            sock = _tls(sock, host, where, security, protocol)
        else:
            _expect_kafka(sock, host, port, where, protocol, deadline)
        mechanism = str(security.get("sasl_mechanism") or "")
        if protocol.startswith("SASL_") and mechanism.upper() in _PROBED_MECHANISMS:
            _authenticate(sock, host, where, security, mechanism.upper(), deadline)
    finally:
        sock.close()


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=_left(deadline))
    except OSError as exc:
        raise _Undecided(f"no connection ({exc})") from None
    sock.settimeout(_left(deadline))
    return sock


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())


def _tls(
    sock: socket.socket, host: str, where: str, security: Mapping[str, Any], protocol: str
) -> ssl.SSLSocket:
    context = _ssl_context(security)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        cafile = security.get("ssl_cafile")
        trusted = f"the CA in kafka.ssl_cafile ({cafile})" if cafile else "the system's CAs"
        raise UserError(
            f"TLS: the certificate of the broker at {where} is not trusted by {trusted}: "
            f"{exc.verify_message or exc.reason}. Set kafka.ssl_cafile to the CA that signed "
            "the broker's certificate, and connect by a name the certificate holds"
        ) from None
    except ssl.SSLError as exc:
        if isinstance(exc, ssl.SSLEOFError) or exc.reason == "WRONG_VERSION_NUMBER":
            raise UserError(
                f"TLS: the broker at {where} does not answer TLS (kafka.security_protocol is "
                f"{protocol}): that listener is plaintext; use the broker's TLS listener, or "
                "set kafka.security_protocol to PLAINTEXT or SASL_PLAINTEXT if it has none"
            ) from None
        raise UserError(f"TLS handshake with the broker at {where} failed: {exc}") from None
    except OSError as exc:
        raise _Undecided(f"TLS handshake interrupted ({exc})") from None


def _ssl_context(security: Mapping[str, Any]) -> ssl.SSLContext:
    """The context kafka-python builds from the same options (its KafkaSSLTransport)."""
    if security.get("ssl_context") is not None:
        context: ssl.SSLContext = security["ssl_context"]
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = bool(security.get("ssl_check_hostname", True))
    cafile, certfile = security.get("ssl_cafile"), security.get("ssl_certfile")
    try:
        if cafile:
            context.load_verify_locations(cafile)
        else:
            context.load_default_certs()
        if certfile:
            context.load_cert_chain(certfile, security.get("ssl_keyfile") or None)
    except (OSError, ssl.SSLError) as exc:
        problem = getattr(exc, "strerror", None) or exc
        raise UserError(
            f"TLS: cannot load kafka.ssl_cafile/ssl_certfile/ssl_keyfile ({problem}): point "
            "them at readable PEM files"
        ) from None
    return context


def _expect_kafka(
    sock: socket.socket, host: str, port: int, where: str, protocol: str, deadline: float
) -> None:
    """A plaintext listener answers ApiVersions (read whole: SASL may follow on this
    connection); a TLS one answers with a TLS alert."""
    parser = KafkaProtocol(client_id="iotfuse-check")
    parser.send_request(ApiVersionsRequest(version=0))
    try:
        sock.sendall(parser.send_bytes())
        first = sock.recv(65536)
    except OSError:
        first = b""
    if len(first) >= 2 and first[0] in _TLS_RECORD_TYPES and first[1] == 0x03:
        raise _tls_expected(where, protocol)
    if not first:
        if _speaks_tls(host, port, deadline):  # closed without a word: try TLS
            raise _tls_expected(where, protocol)
        raise _Undecided("the connection closed without an answer")
    _receive(sock, parser, first, "ApiVersions")


def _tls_expected(where: str, protocol: str) -> UserError:
    secure = "SASL_SSL" if protocol == "SASL_PLAINTEXT" else "SSL"
    return UserError(
        f"the broker at {where} expects TLS but kafka.security_protocol is {protocol}: set it "
        f"to {secure} (and kafka.ssl_cafile to the CA of the broker's certificate), or use "
        "the broker's plaintext listener"
    )


def _speaks_tls(host: str, port: int, deadline: float) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only: does it speak TLS at all
    try:
        with context.wrap_socket(_connect(host, port, deadline), server_hostname=host):
            return True
    except (OSError, _Undecided):
        return False


def _authenticate(
    sock: socket.socket,
    host: str,
    where: str,
    security: Mapping[str, Any],
    mechanism: str,
    deadline: float,
) -> None:
    user = security.get("sasl_plain_username") or ""
    parser = KafkaProtocol(client_id="iotfuse-check")
    handshake = _call(sock, parser, SaslHandshakeRequest(mechanism=mechanism, version=1))
    if mechanism not in handshake.mechanisms:
        raise UserError(
            f"SASL: the broker at {where} does not enable kafka.sasl_mechanism {mechanism} "
            f"(it enables {', '.join(handshake.mechanisms) or 'none'}): set one of those"
        )
    client = get_sasl_mechanism(mechanism)(host=host, **security)
    while not client.is_done():
        if time.monotonic() > deadline:
            raise _Undecided("SASL authentication took too long")
        answer = _call(
            sock, parser, SaslAuthenticateRequest(auth_bytes=client.auth_bytes(), version=1)
        )
        if answer.error_code:
            raise UserError(
                f"SASL authentication as '{user}' at {where} failed "
                f"({answer.error_message or 'error ' + str(answer.error_code)}): check "
                "kafka.sasl_username, kafka.sasl_password and kafka.sasl_mechanism"
            )
        client.receive(answer.auth_bytes)
    if not client.is_authenticated():
        raise UserError(
            f"SASL authentication as '{user}' at {where} failed (the broker's proof did not "
            "verify): check kafka.sasl_mechanism and that this is the intended broker"
        )


def _call(sock: socket.socket, parser: KafkaProtocol, request: Any) -> Any:
    parser.send_request(request)
    try:
        sock.sendall(parser.send_bytes())
    except OSError as exc:
        raise _Undecided(f"{request.name}: {exc!r}") from None
    return _receive(sock, parser, b"", request.name)


def _receive(sock: socket.socket, parser: KafkaProtocol, data: bytes, name: str) -> Any:
    """The response to the one request in flight, `data` its first bytes if read already."""
    try:
        while True:
            responses = parser.receive_bytes(data) if data else []
            if responses:
                return responses[0][1]
            data = sock.recv(65536)
            if not data:
                raise _Undecided(f"the broker closed the connection during {name}")
    except (OSError, KafkaError) as exc:  # KafkaError: a reply that does not parse
        raise _Undecided(f"{name}: {exc!r}") from None
