"""Validation of a ``Policy`` value: the problems that make it unusable and the warnings.

Owns the walk over a policy and the key paths it reports (``spec.rules[0].to[0].operation.paths``,
the same paths the YAML parser uses, so the parser can add line numbers). It reads values only;
it returns data and never raises for a bad policy (the caller decides), never logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from authz import _syntax
from authz.model import (
    HTTP_ONLY_OPERATION_FIELDS,
    HTTP_ONLY_SOURCE_FIELDS,
    OPERATION_FIELDS,
    SOURCE_FIELDS,
    Action,
    Operation,
    Policy,
    Rule,
    Source,
    condition_is_http_only,
    rule_http_only_fields,
)

Problem = tuple[str, str]  # (key path, what was expected)

_SOURCE_CHECKS: dict[str, Callable[[str], object]] = {
    "principals": _syntax.check_principal_pattern,
    "trust_domains": _syntax.check_trust_domain_pattern,
    "ip_blocks": _syntax.parse_ip_block,
    "request_principals": _syntax.check_principal_pattern,
}
_OPERATION_CHECKS: dict[str, Callable[[str], object]] = {
    "hosts": _syntax.check_string_pattern,
    "methods": _syntax.check_string_pattern,
    "paths": _syntax.check_path_pattern,
}


def _base(field: str) -> str:
    return field.removeprefix("not_")


def policy_problems(policy: Policy) -> list[Problem]:
    """Every reason ``policy`` cannot be compiled, in document order (empty when it can)."""
    return list(_problems(policy))


def _problems(policy: Policy) -> Iterator[Problem]:
    if not isinstance(policy.name, str) or not _syntax.POLICY_NAME.fullmatch(policy.name):
        yield (
            "metadata.name",
            "expected a name of lower-case letters, digits, '-' and '.', starting and ending "
            f"with a letter or digit, at most 253 characters (got {policy.name!r})",
        )
    if not isinstance(policy.action, Action):
        yield "spec.action", f"expected ALLOW, DENY or AUDIT (got {policy.action!r})"
    if policy.selector is not None:
        if not policy.selector:
            yield "spec.selector.spiffe_ids", "expected a non-empty list of SPIFFE IDs"
        for index, spiffe_id in enumerate(policy.selector):
            yield from _check(
                f"spec.selector.spiffe_ids[{index}]", spiffe_id, _syntax.check_spiffe_id
            )
    for index, rule in enumerate(policy.rules):
        yield from _rule_problems(f"spec.rules[{index}]", rule)


def _rule_problems(path: str, rule: Rule) -> Iterator[Problem]:
    for index, source in enumerate(rule.from_):
        yield from _source_problems(f"{path}.from[{index}].source", source)
    for index, operation in enumerate(rule.to):
        yield from _operation_problems(f"{path}.to[{index}].operation", operation)
    for index, condition in enumerate(rule.when):
        where = f"{path}.when[{index}]"
        try:
            kind, _ = _syntax.parse_condition_key(condition.key)
        except ValueError as err:
            yield f"{where}.key", str(err)
            continue
        if not condition.values and not condition.not_values:
            yield where, "expected values or not_values (a non-empty list) or both"
        for name, values in (("values", condition.values), ("not_values", condition.not_values)):
            for at, value in enumerate(values):
                yield from _check(
                    f"{where}.{name}[{at}]",
                    value,
                    partial(_syntax.check_condition_value, kind),
                )


def _source_problems(path: str, source: Source) -> Iterator[Problem]:
    if not any(getattr(source, name) for name in SOURCE_FIELDS):
        yield path, f"expected at least one of {', '.join(SOURCE_FIELDS)}"
    for name in SOURCE_FIELDS:
        check = _SOURCE_CHECKS[_base(name)]
        for index, value in enumerate(getattr(source, name)):
            yield from _check(f"{path}.{name}[{index}]", value, check)


def _operation_problems(path: str, operation: Operation) -> Iterator[Problem]:
    if not any(getattr(operation, name) for name in OPERATION_FIELDS):
        yield path, f"expected at least one of {', '.join(OPERATION_FIELDS)}"
    for name in OPERATION_FIELDS:
        values = getattr(operation, name)
        for index, value in enumerate(values):
            where = f"{path}.{name}[{index}]"
            if _base(name) == "ports":
                yield from _check(where, value, _syntax.parse_port)
            else:
                yield from _check(where, value, _OPERATION_CHECKS[_base(name)])


def _check(path: str, value: object, check: Callable[[Any], object]) -> Iterator[Problem]:
    if not isinstance(value, str | int) or isinstance(value, bool):
        yield path, f"expected a string (got {value!r})"
        return
    try:
        check(value)
    except ValueError as err:
        yield path, str(err)


def policy_warnings(policy: Policy) -> list[Problem]:
    """Legal but surprising constructs, with the key path each one is at."""
    found: list[Problem] = []
    if not policy.rules and policy.action is not Action.ALLOW:
        found.append(
            ("spec", f"a {policy.action} policy without rules matches nothing and has no effect")
        )
    for index, rule in enumerate(policy.rules):
        path = f"spec.rules[{index}]"
        http_fields = rule_http_only_fields(rule)
        if http_fields:
            found.append((path, _l4_warning(policy.action, rule, http_fields)))
        for at, operation in enumerate(rule.to):
            for name in ("methods", "not_methods"):
                for m_index, method in enumerate(getattr(operation, name)):
                    if method != method.upper():
                        found.append(
                            (
                                f"{path}.to[{at}].operation.{name}[{m_index}]",
                                f"method {method!r} is not upper-case; methods are "
                                f"case-sensitive (RFC 9110 §9.1) so it only matches a client "
                                f"that sends exactly {method!r}",
                            )
                        )
    return found


def _l4_warning(action: Action, rule: Rule, http_fields: tuple[str, ...]) -> str:
    used = ", ".join(http_fields)
    if action is Action.ALLOW:
        return (
            f"uses HTTP-only fields ({used}): on an L4 (TCP) connection this ALLOW rule never "
            f"matches (Istio semantics)"
        )
    verb = "denies" if action is Action.DENY else "audits"
    if not _has_l4_constraint(rule):
        return (
            f"uses HTTP-only fields ({used}) and nothing else: on an L4 (TCP) connection they "
            f"are ignored, so this rule {verb} every L4 connection (Istio semantics)"
        )
    return (
        f"uses HTTP-only fields ({used}): on an L4 (TCP) connection they are ignored and the "
        f"rule {verb} on its other fields alone (Istio semantics)"
    )


def _has_l4_constraint(rule: Rule) -> bool:
    """Whether the rule still constrains anything once its HTTP-only parts are dropped."""
    sources_l4 = all(
        any(getattr(s, n) for n in SOURCE_FIELDS if n not in HTTP_ONLY_SOURCE_FIELDS)
        for s in rule.from_
    )
    operations_l4 = all(
        any(getattr(o, n) for n in OPERATION_FIELDS if n not in HTTP_ONLY_OPERATION_FIELDS)
        for o in rule.to
    )
    conditions_l4 = any(not condition_is_http_only(c.key) for c in rule.when)
    return (bool(rule.from_) and sources_l4) or (bool(rule.to) and operations_l4) or conditions_l4
