"""Benchmark of the authorization engine: 1,000 policies, one decision at a time.

Builds 1,000 policies (per-workload ALLOW, DENY and AUDIT policies, multi-workload selectors and
mesh-wide DENY policies; principals, prefixes, paths, methods, headers, claims, ports, IP blocks),
compiles them, then times single decisions over a mix of HTTP requests and L4 connections.
Prints p50/p99 latency in microseconds and decisions per second. Goal: p99 under 20 µs.

Run: ``.venv/bin/python bench/authz.py`` (``--decisions N`` to change the sample size).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from authz import Action, Condition, Engine, Operation, Policy, Request, Rule, Source

TD = "example.org"
WORKLOADS = 248  # x4 per-workload policies = 992, plus 8 shared ones = 1,000
SEED = 20240601  # fixed so two runs measure the same policy set and request mix
GOAL_P99_US = 20.0  # the target for one decision at p99 with 1,000 policies
REQUESTS = 10_000  # distinct requests, cycled through for the timed decisions
L4_SHARE = 0.1  # one decision in ten is a raw TCP connection


def workload(i: int) -> str:
    return f"spiffe://{TD}/ns/team-{i % 16}/svc-{i}"


def build_policies(rng: random.Random) -> list[Policy]:
    policies: list[Policy] = []
    for i in range(WORKLOADS):
        me = (workload(i),)
        callers = tuple(workload(rng.randrange(WORKLOADS)) for _ in range(3))
        policies.append(
            Policy(
                f"svc-{i}-read",
                me,
                Action.ALLOW,
                (
                    Rule(
                        from_=(
                            Source(principals=callers),
                            Source(principals=(f"spiffe://{TD}/ns/team-{i % 16}/*",)),
                        ),
                        to=(Operation(methods=("GET", "HEAD"), paths=("/api/v1/*", "/healthz")),),
                    ),
                ),
            )
        )
        policies.append(
            Policy(
                f"svc-{i}-write",
                me,
                Action.ALLOW,
                (
                    Rule(
                        from_=(Source(principals=callers[:1]),),
                        to=(Operation(methods=("POST", "PUT"), paths=("/api/v1/items/*",)),),
                        when=(Condition("request.headers[x-tenant]", ("blue", "green")),),
                    ),
                    Rule(
                        from_=(Source(request_principals=(f"spiffe://{TD}/ns/ci/*",)),),
                        to=(Operation(ports=(8443,)),),
                        when=(Condition("request.auth.claims[scope]", ("deploy",)),),
                    ),
                ),
            )
        )
        policies.append(
            Policy(
                f"svc-{i}-admin",
                me,
                Action.DENY,
                (
                    Rule(
                        from_=(Source(not_principals=(f"spiffe://{TD}/ns/ops/admin",)),),
                        to=(Operation(paths=("/admin", "/admin/*")),),
                    ),
                ),
            )
        )
        kind = i % 3
        if kind == 0:
            policies.append(
                Policy(
                    f"svc-{i}-audit",
                    me,
                    Action.AUDIT,
                    (Rule(to=(Operation(methods=("DELETE",)),)),),
                )
            )
        elif kind == 1:
            policies.append(
                Policy(
                    f"svc-{i}-l4",
                    me,
                    Action.ALLOW,
                    (
                        Rule(
                            from_=(Source(ip_blocks=("10.0.0.0/8",), principals=("*",)),),
                            to=(Operation(ports=(5432, 6379)),),
                        ),
                    ),
                )
            )
        else:
            policies.append(
                Policy(
                    f"svc-{i}-hosts",
                    me,
                    Action.DENY,
                    (Rule(to=(Operation(not_hosts=(f"svc-{i}.example.org", "*.internal")),)),),
                )
            )
    for group in range(6):
        selected = tuple(workload(j) for j in range(group * 40, group * 40 + 10))
        policies.append(
            Policy(
                f"shared-metrics-{group}",
                selected,
                Action.ALLOW,
                (Rule(from_=(Source(trust_domains=(TD,)),), to=(Operation(paths=("/metrics",)),)),),
            )
        )
    policies.append(
        Policy(
            "mesh-foreign",
            None,
            Action.DENY,
            (Rule(from_=(Source(not_trust_domains=(TD, "partner.example")),)),),
        )
    )
    policies.append(
        Policy("mesh-debug", None, Action.DENY, (Rule(to=(Operation(paths=("/debug/*",)),)),))
    )
    return policies


def build_requests(rng: random.Random) -> list[Request]:
    """A mix where most calls are legitimate, as in a working mesh, with some that are not."""
    paths = ["/api/v1/items/42", "/api/v1/users", "/healthz", "/admin", "/metrics", "/debug/x"]
    path_weights = [40, 20, 15, 10, 10, 5]
    requests: list[Request] = []
    for _ in range(REQUESTS):
        dest = rng.randrange(WORKLOADS)
        teammate = workload(dest % 16 + 16 * rng.randrange(WORKLOADS // 16))
        stranger = workload(rng.randrange(WORKLOADS))
        peer = rng.choices(
            [teammate, stranger, f"spiffe://{TD}/ns/ops/admin", None], [60, 20, 10, 10]
        )[0]
        address = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        if rng.random() < L4_SHARE:
            port = rng.choice([5432, 6379, 8443])
            requests.append(Request(workload(dest), peer, address, port, is_l4=True))
            continue
        requests.append(
            Request(
                workload(dest),
                peer,
                address,
                8443,
                method=rng.choices(["GET", "POST", "PUT", "DELETE"], [70, 15, 10, 5])[0],
                host=rng.choices(
                    [f"svc-{dest}.example.org", "svc.internal", "Evil.com:80"], [85, 10, 5]
                )[0],
                path=rng.choices(paths, path_weights)[0],
                headers={"x-tenant": rng.choice(["blue", "red"]), "user-agent": "bench"},
                claims={"scope": "deploy"} if rng.random() < 0.1 else {},
            )
        )
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(SEED)
    policies = build_policies(rng)
    started = time.perf_counter()
    engine = Engine.compile(policies, trust_domain=TD, federated_trust_domains=["partner.example"])
    compile_ms = (time.perf_counter() - started) * 1e3
    requests = build_requests(rng)

    evaluate = engine.evaluate
    for request in requests:  # warm up caches (address parsing, branch paths)
        evaluate(request)

    clock = time.perf_counter_ns
    samples: list[int] = []
    allowed = 0
    count = len(requests)
    for n in range(args.decisions):
        request = requests[n % count]
        begin = clock()
        verdict = evaluate(request)
        samples.append(clock() - begin)
        allowed += verdict.allowed

    started = time.perf_counter()
    for n in range(args.decisions):
        evaluate(requests[n % count])
    throughput = args.decisions / (time.perf_counter() - started)

    samples.sort()
    p50 = samples[len(samples) // 2] / 1e3
    p99 = samples[int(len(samples) * 0.99)] / 1e3
    p999 = samples[int(len(samples) * 0.999)] / 1e3
    print(f"policies: {len(policies)} compiled in {compile_ms:.0f} ms")
    print(f"decisions: {args.decisions} ({allowed / args.decisions:.0%} allowed)")
    print(f"latency: p50 {p50:.2f} µs  p99 {p99:.2f} µs  p99.9 {p999:.2f} µs", end="")
    print(f"  mean {statistics.fmean(samples) / 1e3:.2f} µs")
    print(f"throughput: {throughput:,.0f} decisions/s (one thread)")
    print(f"goal p99 < {GOAL_P99_US:.0f} µs: {'met' if p99 < GOAL_P99_US else 'MISSED'}")


if __name__ == "__main__":
    main()
