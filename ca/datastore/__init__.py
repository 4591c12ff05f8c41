"""Persistence for the CA server: schema, migrations and the repository."""

from .repository import (
    AuditRecord,
    AuthorityRecord,
    Datastore,
    DatastoreError,
    FederatedBundleRecord,
    JoinTokenRecord,
    Tx,
    sqlite_url,
)

__all__ = [
    "AuditRecord",
    "AuthorityRecord",
    "Datastore",
    "DatastoreError",
    "FederatedBundleRecord",
    "JoinTokenRecord",
    "Tx",
    "sqlite_url",
]
