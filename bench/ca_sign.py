"""X.509-SVIDs signed per second from CSRs through the server's own signing path, beside the
raw `cryptography` sign loop in the same run.

Server path: CSR parsed and its signature checked, SVID built and signed, then validated against
the X509-SVID rules and verified to the bundle (the CA checks its own output), and one audit
event per SVID committed to a real SQLite file (WAL, synchronous=FULL). Measured for single
mints (one transaction each, like `meshid x509 mint`), batches of 50 and the agent's own batch
size (``node_agent.agent.SIGN_BATCH``, the CSRs one BatchNewX509SVID call carries).
Raw loop: load the CSR and check its signature (proof of possession, which any CA signing from
CSRs must do), build the same leaf and sign it; nothing else. The ratio is then what our own
work costs on top of the unavoidable cryptography: validation, audit, the database.

As ``ca.server.serve`` does once startup is over, the bench calls ``gc.freeze()`` after starting
the service, so full garbage collections stop walking the ~100k long-lived startup objects (each
such pass otherwise stalls the signing path for tens of milliseconds). Both paths run frozen.

Run: .venv/bin/python bench/ca_sign.py [--count N] [--rounds R]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import SpiffeId, TrustDomain

from ca.datastore import Datastore
from ca.keys import KeyType, MemoryKeyManager, generate_key
from ca.service import CaService, CaSettings, X509Request
from ca.x509svid import public_key_from_csr
from node_agent.agent import SIGN_BATCH

ID = SpiffeId("spiffe://example.org/bench/web")
# One SVID per transaction (`meshid x509 mint`), a small batch, and the agent's own batch size.
BATCHES = (1, 50, SIGN_BATCH)


def make_csrs(count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        key = generate_key(KeyType.EC_P256)
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        csr = builder.sign(key, hashes.SHA256())
        out.append(csr.public_bytes(serialization.Encoding.DER))
    return out


def raw_loop(service: CaService, csrs: list[bytes]) -> float:
    """The bare minimum: load and check the CSR, build a leaf with the same extensions, sign."""
    _, authority = service._x509_signer()  # the bench borrows the live signer
    issuer = authority.certificate
    now = datetime.now(UTC)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(ID))])
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key())
    t0 = time.perf_counter()
    for der in csrs:
        csr = x509.load_der_x509_csr(der)
        if not csr.is_signature_valid:
            raise ValueError("bad CSR")
        pub = csr.public_key()
        (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshid")]))
            .issuer_name(issuer.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, True, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(aki, critical=False)
            .sign(authority.key, hashes.SHA256())
        )
    return len(csrs) / (time.perf_counter() - t0)


def server_path(service: CaService, csrs: list[bytes], batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(csrs), batch):
        reqs = [X509Request(ID, public_key_from_csr(der)) for der in csrs[i : i + batch]]
        service.sign_x509_svids(reqs, "bench")
    return len(csrs) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="best of N interleaved rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Datastore(f"sqlite:///{Path(tmp) / 'bench.sqlite3'}")
        service = CaService(
            CaSettings(trust_domain=TrustDomain("example.org"), server_id="bench"),
            store,
            MemoryKeyManager(),
        )
        service.start()
        gc.collect()  # as ca.server.serve does after startup: see the module docstring
        gc.freeze()
        csrs = make_csrs(args.count)
        raw_loop(service, csrs[:100])  # warm up
        # Rounds interleave the paths and each keeps its best, so that a burst of load from
        # elsewhere on the machine hits one round of one path rather than the ratio.
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            runs = [("raw cryptography loop", lambda: raw_loop(service, csrs))]
            runs += [
                (f"server path, batch {n}", lambda n=n: server_path(service, csrs, n))
                for n in BATCHES
            ]
            for name, run in runs:
                best[name] = max(best.get(name, 0.0), run())
        store.close()
    raw = best["raw cryptography loop"]
    print(f"X.509-SVID signing, EC P-256, {args.count} CSRs, SQLite synchronous=FULL")
    print(f"{'path':<28}{'SVIDs/s':>10}{'ratio':>8}")
    for name, rate in best.items():
        print(f"{name:<28}{rate:>10.0f}{rate / raw:>8.2f}")
    print(f"goal: server path at the agent's batch ({SIGN_BATCH}) >= 0.80 of the raw loop")


if __name__ == "__main__":
    main()
