"""Persistence for the CA server: schema, migrations and the repository."""

from .repository import (
    AuthorityRecord,
    Datastore,
    DatastoreError,
    FederatedBundleRecord,
    JoinTokenRecord,
    Tx,
    sqlite_url,
)

__all__ = [
    "AuthorityRecord",
    "Datastore",
    "DatastoreError",
    "FederatedBundleRecord",
    "JoinTokenRecord",
    "Tx",
    "sqlite_url",
]
