"""Errors of the proxy package.

``ProxyError`` is the package root. ``ConfigError`` (the proxy configuration is invalid),
``IdentityError`` (no usable SVID or bundle), ``PeerRejected`` (a TLS peer failed SPIFFE
authentication) and ``NoOriginalDestination`` (a transparent listener cannot tell where a
connection was going) are the subclasses callers branch on.
"""

from __future__ import annotations

from enum import StrEnum


class ProxyError(Exception):
    """Root of every error raised by the ``tls_proxy`` package."""


class ConfigError(ProxyError):
    """The proxy configuration breaks a rule; the message names file, key and expectation."""


class IdentityError(ProxyError):
    """The identity source has no usable SVID or bundle (unreadable file, bad PEM, no agent)."""


class RejectReason(StrEnum):
    """Why a TLS peer was refused: the label of the failure counter and the access log."""

    NO_CLIENT_CERTIFICATE = "no_client_certificate"
    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    WRONG_TRUST_DOMAIN = "wrong_trust_domain"
    UNEXPECTED_ID = "unexpected_id"
    NOT_AN_SVID = "not_an_svid"
    HANDSHAKE_FAILED = "handshake_failed"


class NoOriginalDestination(ProxyError):
    """A connection to a transparent listener has no usable original destination (it was not
    redirected, or it would loop back to the proxy); the listener refuses it."""


class PeerRejected(ProxyError):
    """A peer failed SPIFFE authentication; ``reason`` classifies it, the message details it."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
