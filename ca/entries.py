"""Registration entries: the model and its validation.

Owns the rules an entry must meet before it is stored (SPIFFE IDs per the SPIFFE-ID spec via
py-spiffe's parser, selector syntax, TTL bounds, sizes). Pure: no database, no clock.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from .errors import InvalidArgument

SELECTOR_TYPE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_SELECTOR_VALUE = 1024  # long enough for k8s label sets and sha256 digests, short of abuse
MAX_SELECTORS = 64  # SPIRE entries rarely carry more than a handful
MAX_DNS_NAMES = 32
MAX_FEDERATES_WITH = 64
MAX_HINT = 128  # the Workload API hint is a short operator label
MIN_SVID_TTL = timedelta(seconds=1)  # tests and demos rotate every few seconds
MAX_SVID_TTL = timedelta(days=30)  # longer-lived identities defeat short-lived certificates
RESERVED_PATH_PREFIX = "/meshid/"  # agent and server identities live here; entries may not
# The node API's TLS name (ca.server_identity.SERVER_TLS_NAME): agents check the server SVID for
# it, so no workload SVID may carry it.
RESERVED_DNS_NAMES = frozenset({"meshid-server"})
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


@dataclass(frozen=True, order=True)
class Selector:
    """A ``type:value`` fact an attestor reports about a workload or node."""

    type: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"

    @classmethod
    def parse(cls, text: str, *, field_name: str = "selectors") -> Selector:
        """Parse ``type:value``; the value may itself contain colons (``k8s:ns:default``)."""
        if not isinstance(text, str):
            raise InvalidArgument(field_name, "must be a string of the form type:value", text)
        kind, sep, value = text.partition(":")
        if not sep:
            raise InvalidArgument(field_name, "must be of the form type:value", text)
        if not SELECTOR_TYPE.fullmatch(kind):
            raise InvalidArgument(
                field_name, "type must match [a-z0-9][a-z0-9_-]{0,63} (e.g. unix, k8s)", text
            )
        if not value:
            raise InvalidArgument(field_name, "value must not be empty", text)
        if len(value) > MAX_SELECTOR_VALUE:
            raise InvalidArgument(
                field_name, f"value must be at most {MAX_SELECTOR_VALUE} characters", text
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise InvalidArgument(field_name, "value must not contain control characters", text)
        return cls(kind, value)


@dataclass(frozen=True)
class EntrySpec:
    """What an operator asks for; validated by ``validate_entry``."""

    spiffe_id: str
    parent_id: str
    selectors: Sequence[str]
    x509_svid_ttl: int = 0  # seconds; 0 = server default
    jwt_svid_ttl: int = 0
    dns_names: Sequence[str] = ()
    hint: str = ""
    admin: bool = False
    downstream: bool = False
    federates_with: Sequence[str] = ()
    expires_at: datetime | None = None


@dataclass(frozen=True)
class RegistrationEntry:
    """A validated entry as stored."""

    id: str
    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    x509_svid_ttl: timedelta | None
    jwt_svid_ttl: timedelta | None
    dns_names: tuple[str, ...] = ()
    hint: str = ""
    admin: bool = False
    downstream: bool = False
    federates_with: tuple[TrustDomain, ...] = ()
    expires_at: datetime | None = None
    revision: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def selectors_key(self) -> str:
        """Identity of the selector set, for the (spiffe_id, parent_id, selectors) uniqueness."""
        return selectors_key(self.selectors)


def selectors_key(selectors: Iterable[Selector]) -> str:
    """A stable digest of a selector set (order and duplicates do not matter)."""
    canon = "\n".join(sorted({str(s) for s in selectors}))
    return hashlib.sha256(canon.encode()).hexdigest()


def _detail(err: PySpiffeError) -> str:
    """py-spiffe's reason without its repetition of the input (we show the value ourselves)."""
    text = str(err)
    return text.split("': ", 1)[1] if "': " in text else text.split(": ", 1)[-1]


def parse_spiffe_id(value: object, field_name: str) -> SpiffeId:
    """Parse a SPIFFE ID with py-spiffe, naming the field on failure (SPIFFE-ID §2)."""
    if not isinstance(value, str):
        raise InvalidArgument(field_name, "must be a SPIFFE ID string", value)
    if len(value.encode()) > 2048:
        raise InvalidArgument(field_name, "must be at most 2048 bytes (SPIFFE-ID §2.3)")
    try:
        parsed = SpiffeId(value)
    except PySpiffeError as err:
        raise InvalidArgument(field_name, f"invalid SPIFFE ID: {_detail(err)}", value) from err
    if str(parsed) != value:
        # py-spiffe folds case; the spec allows only lowercase scheme and trust domain.
        raise InvalidArgument(
            field_name, "scheme and trust domain must be lowercase (SPIFFE-ID §2.1)", value
        )
    return parsed


def parse_trust_domain(value: object, field_name: str) -> TrustDomain:
    """Parse a trust domain name or ``spiffe://name`` with py-spiffe."""
    if not isinstance(value, str):
        raise InvalidArgument(field_name, "must be a trust domain name", value)
    try:
        parsed = TrustDomain(value)
    except PySpiffeError as err:
        raise InvalidArgument(field_name, f"invalid trust domain: {_detail(err)}", value) from err
    if value not in (parsed.name, parsed.as_spiffe_id()):
        raise InvalidArgument(field_name, "must be lowercase (SPIFFE-ID §2.1)", value)
    return parsed


def validate_dns_name(name: object, field_name: str = "dns_names") -> str:
    """RFC 1123 host name, optionally a leading ``*.`` wildcard label."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(field_name, "must be a non-empty DNS name", name)
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if len(name) > 253 or not labels or not all(_DNS_LABEL.fullmatch(x) for x in labels):
        raise InvalidArgument(field_name, "must be an RFC 1123 DNS name", name)
    if name.lower() in RESERVED_DNS_NAMES:
        raise InvalidArgument(
            field_name, "is reserved for the meshid server's node API certificate", name
        )
    return name.lower()


def _ttl(seconds: object, field_name: str) -> timedelta | None:
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise InvalidArgument(field_name, "must be a whole number of seconds", seconds)
    if seconds == 0:
        return None
    lo, hi = int(MIN_SVID_TTL.total_seconds()), int(MAX_SVID_TTL.total_seconds())
    if not lo <= seconds <= hi:
        raise InvalidArgument(field_name, f"must be 0 (server default) or {lo}..{hi}", seconds)
    return timedelta(seconds=seconds)


def validate_entry(
    spec: EntrySpec, trust_domain: TrustDomain, *, entry_id: str = "", now: datetime | None = None
) -> RegistrationEntry:
    """Check every rule of ``spec`` and return the entry to store (revision set by the store)."""
    spiffe_id = parse_spiffe_id(spec.spiffe_id, "spiffe_id")
    if spiffe_id.trust_domain != trust_domain:
        raise InvalidArgument(
            "spiffe_id", f"must be in this server's trust domain {trust_domain}", spec.spiffe_id
        )
    if not spiffe_id.path or spiffe_id.path == "/":
        raise InvalidArgument("spiffe_id", "must have a path (SPIFFE-ID §2.2)", spec.spiffe_id)
    if spiffe_id.path.startswith(RESERVED_PATH_PREFIX):
        raise InvalidArgument(
            "spiffe_id", f"paths under {RESERVED_PATH_PREFIX} are reserved for meshid itself"
        )
    parent_id = parse_spiffe_id(spec.parent_id, "parent_id")
    if parent_id.trust_domain != trust_domain:
        raise InvalidArgument(
            "parent_id", f"must be in this server's trust domain {trust_domain}", spec.parent_id
        )
    if isinstance(spec.selectors, str) or not spec.selectors:
        raise InvalidArgument("selectors", "at least one selector type:value is required")
    if len(spec.selectors) > MAX_SELECTORS:
        raise InvalidArgument("selectors", f"at most {MAX_SELECTORS} selectors")
    selectors = tuple(sorted({Selector.parse(s) for s in spec.selectors}))
    if len(spec.dns_names) > MAX_DNS_NAMES:
        raise InvalidArgument("dns_names", f"at most {MAX_DNS_NAMES} names")
    dns_names = tuple(dict.fromkeys(validate_dns_name(n) for n in spec.dns_names))
    if not isinstance(spec.hint, str) or len(spec.hint) > MAX_HINT:
        raise InvalidArgument("hint", f"must be a string of at most {MAX_HINT} characters")
    if spec.hint and not _PRINTABLE.fullmatch(spec.hint):
        raise InvalidArgument("hint", "must be printable ASCII without spaces", spec.hint)
    if len(spec.federates_with) > MAX_FEDERATES_WITH:
        raise InvalidArgument("federates_with", f"at most {MAX_FEDERATES_WITH} trust domains")
    federates = tuple(
        dict.fromkeys(parse_trust_domain(t, "federates_with") for t in spec.federates_with)
    )
    if trust_domain in federates:
        raise InvalidArgument("federates_with", "must not name this server's own trust domain")
    expires_at = spec.expires_at
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidArgument("expires_at", "must carry a time zone (RFC 3339)")
        if now is not None and expires_at <= now:
            raise InvalidArgument("expires_at", "must be in the future", expires_at.isoformat())
    return RegistrationEntry(
        id=entry_id,
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=selectors,
        x509_svid_ttl=_ttl(spec.x509_svid_ttl, "x509_svid_ttl"),
        jwt_svid_ttl=_ttl(spec.jwt_svid_ttl, "jwt_svid_ttl"),
        dns_names=dns_names,
        hint=spec.hint,
        admin=bool(spec.admin),
        downstream=bool(spec.downstream),
        federates_with=federates,
        expires_at=expires_at,
    )
