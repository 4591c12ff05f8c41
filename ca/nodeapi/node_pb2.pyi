from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttestAgentRequest(_message.Message):
    __slots__ = ("params", "challenge_response")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    params: AttestParams
    challenge_response: bytes
    def __init__(self, params: _Optional[_Union[AttestParams, _Mapping]] = ..., challenge_response: _Optional[bytes] = ...) -> None: ...

class AttestParams(_message.Message):
    __slots__ = ("type", "payload", "csr")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    type: str
    payload: bytes
    csr: bytes
    def __init__(self, type: _Optional[str] = ..., payload: _Optional[bytes] = ..., csr: _Optional[bytes] = ...) -> None: ...

class AttestAgentResponse(_message.Message):
    __slots__ = ("challenge", "svid")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    SVID_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    svid: AgentSvid
    def __init__(self, challenge: _Optional[bytes] = ..., svid: _Optional[_Union[AgentSvid, _Mapping]] = ...) -> None: ...

class AgentSvid(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain", "selectors", "bundle")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    selectors: _containers.RepeatedScalarFieldContainer[str]
    bundle: Bundle
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain: _Optional[_Iterable[bytes]] = ..., selectors: _Optional[_Iterable[str]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ...) -> None: ...

class RenewAgentRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class RenewAgentResponse(_message.Message):
    __slots__ = ("svid",)
    SVID_FIELD_NUMBER: _ClassVar[int]
    svid: AgentSvid
    def __init__(self, svid: _Optional[_Union[AgentSvid, _Mapping]] = ...) -> None: ...

class SyncEntriesRequest(_message.Message):
    __slots__ = ("since_revision",)
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    def __init__(self, since_revision: _Optional[int] = ...) -> None: ...

class SyncEntriesResponse(_message.Message):
    __slots__ = ("revision", "full", "more", "upserts", "deleted_ids", "bundle", "federated_bundles", "federated_bundles_set")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    DELETED_IDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_BUNDLES_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_BUNDLES_SET_FIELD_NUMBER: _ClassVar[int]
    revision: int
    full: bool
    more: bool
    upserts: _containers.RepeatedCompositeFieldContainer[Entry]
    deleted_ids: _containers.RepeatedScalarFieldContainer[str]
    bundle: Bundle
    federated_bundles: _containers.RepeatedCompositeFieldContainer[Bundle]
    federated_bundles_set: bool
    def __init__(self, revision: _Optional[int] = ..., full: _Optional[bool] = ..., more: _Optional[bool] = ..., upserts: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., deleted_ids: _Optional[_Iterable[str]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ..., federated_bundles: _Optional[_Iterable[_Union[Bundle, _Mapping]]] = ..., federated_bundles_set: _Optional[bool] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl", "dns_names", "hint", "admin", "downstream", "federates_with", "expires_at", "revision")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    JWT_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    hint: str
    admin: bool
    downstream: bool
    federates_with: _containers.RepeatedScalarFieldContainer[str]
    expires_at: int
    revision: int
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., x509_svid_ttl: _Optional[int] = ..., jwt_svid_ttl: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ..., hint: _Optional[str] = ..., admin: _Optional[bool] = ..., downstream: _Optional[bool] = ..., federates_with: _Optional[_Iterable[str]] = ..., expires_at: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("trust_domain", "spiffe_bundle", "sequence", "tainted_key_ids")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TAINTED_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    spiffe_bundle: bytes
    sequence: int
    tainted_key_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, trust_domain: _Optional[str] = ..., spiffe_bundle: _Optional[bytes] = ..., sequence: _Optional[int] = ..., tainted_key_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class X509SVIDRequest(_message.Message):
    __slots__ = ("entry_id", "csr")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    csr: bytes
    def __init__(self, entry_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class BatchNewX509SVIDRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[X509SVIDRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[X509SVIDRequest, _Mapping]]] = ...) -> None: ...

class X509SVIDResult(_message.Message):
    __slots__ = ("entry_id", "cert_chain", "error")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    error: str
    def __init__(self, entry_id: _Optional[str] = ..., cert_chain: _Optional[_Iterable[bytes]] = ..., error: _Optional[str] = ...) -> None: ...

class BatchNewX509SVIDResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[X509SVIDResult]
    def __init__(self, results: _Optional[_Iterable[_Union[X509SVIDResult, _Mapping]]] = ...) -> None: ...

class NewJWTSVIDRequest(_message.Message):
    __slots__ = ("entry_id", "audience")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ...) -> None: ...

class NewJWTSVIDResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class WatchPoliciesRequest(_message.Message):
    __slots__ = ("since_revision",)
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    def __init__(self, since_revision: _Optional[int] = ...) -> None: ...

class PolicySet(_message.Message):
    __slots__ = ("revision", "policies")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    revision: int
    policies: _containers.RepeatedCompositeFieldContainer[StoredPolicy]
    def __init__(self, revision: _Optional[int] = ..., policies: _Optional[_Iterable[_Union[StoredPolicy, _Mapping]]] = ...) -> None: ...

class StoredPolicy(_message.Message):
    __slots__ = ("name", "document_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    document_json: bytes
    def __init__(self, name: _Optional[str] = ..., document_json: _Optional[bytes] = ...) -> None: ...
