"""The webhook sink: each incident record POSTed as JSON, signed.

Headers: `Content-Type: application/json`, `X-Iotfuse-Signature: sha256=<hex>` (HMAC-SHA256
of the exact body with `sinks.webhook_secret`; absent when no secret is set),
`X-Iotfuse-Incident-Id` and `X-Iotfuse-Seq` (a receiver deduplicates by the pair: after a
restart a record may come twice). Any 2xx answer is a delivery; anything else (an error
status, a redirect, a timeout, a refused connection, a bad certificate) is retried by the
sink's queue. TLS certificates and host names are verified unless
`sinks.webhook_verify_tls` is off.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import UserError
from pipeline.incidents.records import IncidentRecord
from pipeline.settings import SinkSettings
from pipeline.sinks.queue import SinkError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Iotfuse-Signature"


def signature(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=` and the HMAC-SHA256 of `body`, in hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a delivery: urllib would re-send the POST as a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookTarget:
    def __init__(self, s: SinkSettings) -> None:
        parts = urlsplit(s.webhook_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(
                f"sinks.webhook_url {s.webhook_url!r} is not an http:// or https:// URL"
            )
        self.url = s.webhook_url
        self.where = f"{parts.scheme}://{parts.netloc}"  # never the path: it may hold a token
        self.secret = s.webhook_secret
        self.timeout_s = s.webhook_timeout_ms / 1000
        context = ssl.create_default_context(cafile=s.webhook_ca_file or None)
        if not s.webhook_verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            log.warning(
                "webhook sink: TLS verification is off (sinks.webhook_verify_tls): anyone "
                "between iotfuse and %s can read and change incidents",
                self.where,
            )
        self.opener = urllib.request.build_opener(
            _NoRedirect(), urllib.request.HTTPSHandler(context=context)
        )

    def deliver(self, record: IncidentRecord) -> None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "iotfuse",
            "X-Iotfuse-Incident-Id": record.incident_id,
            "X-Iotfuse-Seq": str(record.seq),
        }
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, record.body)
        request = urllib.request.Request(self.url, record.body, headers, method="POST")
        try:
            with self.opener.open(request, timeout=self.timeout_s) as answer:
                status = answer.status
                answer.read(65536)
        except urllib.error.HTTPError as exc:
            raise SinkError(f"{self.where} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:  # timeouts, refusals, TLS
            reason = getattr(exc, "reason", exc)
            raise SinkError(f"POST to {self.where} failed: {reason}") from None
        if not 200 <= status < 300:
            raise SinkError(f"{self.where} answered HTTP {status}")

    def close(self) -> None:
        pass
