"""The node client rebuilds its channel when the agent SVID changes and closes old ones."""

from __future__ import annotations

import asyncio

from cryptography.hazmat.primitives.serialization import Encoding

from ca.keys import KeyType, generate_key, private_key_pem
from node_agent.client import NodeClient
from tests.workload_api import _pki


def test_renewals_do_not_accumulate_channels() -> None:
    bundle = _pki.authority().signing.certificate.public_bytes(Encoding.PEM)
    creds: list[tuple[bytes, bytes] | None] = [None]

    async def scenario() -> None:
        client = NodeClient("127.0.0.1:1", lambda: bundle, lambda: creds[0])
        first = client._stub_now()
        assert client._stub_now() is first, "unchanged credentials reuse the channel"
        for _ in range(4):  # four renewals
            key = generate_key(KeyType.EC_P256)
            creds[0] = (private_key_pem(key), b"chain")
            client._stub_now()
        assert len(client._retired) == 1
        await client.close()
        assert client._closing == set()

    asyncio.run(scenario())
