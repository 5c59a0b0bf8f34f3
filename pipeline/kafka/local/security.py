"""A secured local broker's credentials: a generated CA, the broker's TLS certificate, and
SCRAM-SHA-512 users.

    with LocalKafka(security=SecurityConfig(users={"worker": "w-pass"})) as k:
        settings = dataclasses.replace(Settings().kafka, **k.client_settings("worker"))

The CA and the broker certificate are made here with the `cryptography` package (an
optional dependency: `pip install 'iotfuse[tls]'`) and handed to the broker as PEM strings
(`ssl.keystore.type=PEM`), so neither keytool nor openssl is needed. The broker
certificate names 127.0.0.1 and localhost, so clients verify the host name as well.
"""

from __future__ import annotations

import datetime
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

from pipeline.kafka.local.runtime import KafkaRuntimeError

SCRAM_MECHANISM = "SCRAM-SHA-512"
_NAME = re.compile(r"[A-Za-z0-9._-]+")  # safe inside --add-scram and a JAAS string


def new_password() -> str:
    return secrets.token_urlsafe(18)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """A secured local broker: one SASL_SSL client listener (TLS with a generated CA,
    SCRAM-SHA-512 users) and the standard authorizer with ACLs. `admin_user` is the
    super user (the brokers authenticate to each other as it); `users` (name -> password)
    are ordinary users, allowed nothing until ACLs grant it. Every user is created when the
    storage is formatted."""

    users: Mapping[str, str] = field(default_factory=dict)
    admin_user: str = "admin"
    admin_password: str = field(default_factory=new_password)

    def __post_init__(self) -> None:
        for name, password in {self.admin_user: self.admin_password, **self.users}.items():
            if not (_NAME.fullmatch(name) and _NAME.fullmatch(password)):
                raise ValueError(
                    f"user {name!r}: names and passwords of a local broker's users may hold "
                    "only letters, digits, '.', '_' and '-'"
                )

    @property
    def credentials(self) -> dict[str, str]:
        """Every user (the admin included) -> password."""
        return {**self.users, self.admin_user: self.admin_password}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the CA certificate clients trust, and the broker's certificate and key."""

    ca_cert: Path
    broker_cert: Path  # the broker's certificate followed by the CA's (the chain)
    broker_key: Path  # PKCS#8, unencrypted, readable by the owner only


def write_tls_files(
    directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> TlsFiles:
    """A new CA and a broker certificate for `hosts` signed by it, written into `directory`."""
    _require_cryptography()
    ca_key, ca_cert = make_ca("iotfuse local CA")
    key, cert = _issue(ca_key, ca_cert, "iotfuse local broker", hosts)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "broker.pem", directory / "broker.key")
    files.ca_cert.write_bytes(ca_cert)
    files.broker_cert.write_bytes(cert + ca_cert)
    files.broker_key.touch(mode=0o600)
    files.broker_key.write_bytes(key)
    return files


def _require_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise KafkaRuntimeError(
            "a secured local Kafka makes its certificates with the cryptography package: "
            "install it (pip install cryptography; the dev extra has it)"
        ) from None


def make_ca(name: str) -> tuple[bytes, bytes]:
    """A self-signed CA: (PKCS#8 key, certificate), both PEM. Also what tests use as a CA
    the broker's certificate does not come from."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (
        _builder(subject, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _pem_key(key), _pem_cert(cert)


def _issue(
    ca_key_pem: bytes, ca_cert_pem: bytes, name: str, hosts: tuple[str, ...]
) -> tuple[bytes, bytes]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        _builder(_name(name), ca_cert.subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _pem_key(key), _pem_cert(cert)


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def broker_properties(security: SecurityConfig, tls: TlsFiles, listener: str) -> dict[str, str]:
    """server.properties entries that secure the client listener named `listener` (its
    protocol SASL_SSL), the inter-broker traffic on it included."""
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{security.admin_user}" password="{security.admin_password}";'
    )
    prefix = f"listener.name.{listener.lower()}"
    return {
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
        f"{prefix}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.certificate.chain": tls.broker_cert.read_text(),
        "ssl.keystore.key": tls.broker_key.read_text(),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.certificates": tls.ca_cert.read_text(),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        # the controller listener stays PLAINTEXT on loopback: brokers and controllers reach
        # it as User:ANONYMOUS, which must be allowed the cluster's internal actions
        "super.users": f"User:{security.admin_user};User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
    }


def scram_format_args(security: SecurityConfig) -> list[str]:
    """`kafka-storage format` arguments creating every user's SCRAM credential (KIP-900)."""
    return [
        arg
        for name, password in security.credentials.items()
        for arg in ("--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]")
    ]


def client_settings(
    security: SecurityConfig | None, ca_file: Path | None, bootstrap: str, user: str | None
) -> dict[str, Any]:
    """`[kafka]` settings (KafkaSettings field -> value) for a local cluster at `bootstrap`:
    plaintext, or (secured) TLS trusting `ca_file` and SCRAM as `user` (default: admin)."""
    fields: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "security_protocol": "PLAINTEXT",
        "sasl_mechanism": "",
        "sasl_username": "",
        "sasl_password": "",
        "ssl_cafile": "",
        "ssl_certfile": "",
        "ssl_keyfile": "",
    }
    if security is None or ca_file is None:
        if user is not None:
            raise ValueError("this local Kafka is not secured: it has no users")
        return fields
    name = user or security.admin_user
    if name not in security.credentials:
        raise ValueError(f"no user {name!r} on this local Kafka")
    return {
        **fields,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": SCRAM_MECHANISM,
        "sasl_username": name,
        "sasl_password": security.credentials[name],
        "ssl_cafile": str(ca_file),
    }


def create_acls(
    bootstrap: str,
    admin_security: Mapping[str, Any],
    user: str,
    grants: Iterable[tuple[str, str, str]],
) -> None:
    """ACLs allowing `user` each (resource type, name, operation) of `grants`, created as
    the admin (`admin_security`: its kafka-python options)."""
    acls = [
        ACL(
            f"User:{user}",
            "*",
            ACLOperation[operation.upper()],
            ACLPermissionType.ALLOW,
            ResourcePattern(ResourceType[kind.upper()], name),
        )
        for kind, name, operation in grants
    ]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **admin_security)
    try:
        failed = admin.create_acls(acls)["failed"]
        if failed:
            raise RuntimeError(f"could not create ACLs: {failed}")
        _await_acls(admin, f"User:{user}", {_key(acl) for acl in acls})
    finally:
        admin.close()


def _await_acls(
    admin: KafkaAdminClient,
    principal: str,
    wanted: set[tuple[str, str, str]],
    timeout_s: float = 10.0,
) -> None:
    """Return once the broker applies `wanted` (the controller acknowledged them, but the
    broker's authorizer learns of them from the metadata log a little later)."""
    everything = ACLFilter(
        principal,
        "*",
        ACLOperation.ANY,
        ACLPermissionType.ANY,
        ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
    )
    deadline = time.monotonic() + timeout_s
    while True:
        found, error = admin.describe_acls(everything)
        if wanted <= {_key(acl) for acl in found}:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"ACLs of {principal} not applied after {timeout_s}s ({error})")
        time.sleep(0.05)  # the broker applies metadata within milliseconds


def _key(acl: ACL) -> tuple[str, str, str]:
    pattern = acl.resource_pattern
    return (pattern.resource_type.name, str(pattern.resource_name), acl.operation.name)
