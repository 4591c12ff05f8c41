"""Reading AuthorizationPolicy documents: YAML text or already-decoded data into ``Policy``.

Owns the document format (``apiVersion: meshid/v1``, ``kind: AuthorizationPolicy``, snake_case
keys, unknown keys refused) and precise errors: every ``PolicyError`` names the source, the line
(from YAML node marks), the key path and what was expected. It also returns warnings for legal
but surprising policies. Pure: it takes text or data, never opens a file and never logs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import yaml

from authz import _syntax
from authz._validate import policy_problems, policy_warnings
from authz.errors import PolicyError
from authz.model import (
    OPERATION_FIELDS,
    SOURCE_FIELDS,
    Action,
    Condition,
    Operation,
    Policy,
    Rule,
    Source,
)

API_VERSION = "meshid/v1"
KIND = "AuthorizationPolicy"
HINT_CUTOFF = 0.7  # difflib similarity above which an unknown key is probably a typo
MAX_DEPTH = 32  # a policy nests 8 levels deep; anything far deeper is not a policy
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


@dataclass(frozen=True, slots=True)
class PolicyWarning:
    """A legal but surprising construct, located like a ``PolicyError``."""

    source: str
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class ParseResult:
    """The policies read from one source, in document order, and the warnings about them."""

    policies: tuple[Policy, ...]
    warnings: tuple[PolicyWarning, ...]


class _AliasRefused(Exception):
    """A YAML alias, at a 1-based line; turned into a ``PolicyError`` by ``parse_policies``."""

    def __init__(self, line: int | None) -> None:
        self.line = line
        super().__init__(line)


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing aliases where they appear.

    Aliases can repeat a subtree exponentially ("billion laughs") or make it recursive; a policy
    needs neither, so the alias is refused at its own line before anything is expanded.
    """

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event: yaml.AliasEvent = self.peek_event()  # type: ignore[no-untyped-call]
            mark = event.start_mark
            raise _AliasRefused(None if mark is None else mark.line + 1)
        return super().compose_node(parent, index)


@dataclass(slots=True)
class _Node:
    """A decoded value with the 1-based line it starts on (``None`` for data without lines)."""

    value: object  # a scalar, list[_Node] or _Map
    line: int | None


@dataclass(slots=True)
class _Map:
    items: dict[str, _Node]
    key_lines: dict[str, int | None]


def parse_policies(text: str, source: str) -> ParseResult:
    """Parse every ``---``-separated AuthorizationPolicy document in ``text``.

    ``source`` names the text in messages (a file name, ``<stdin>``). Empty documents are
    skipped; policy names must be unique within the text. Raises ``PolicyError``.
    """
    policies: list[Policy] = []
    warnings: list[PolicyWarning] = []
    names: set[str] = set()
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader refuses unprintable characters right here
        while loader.check_node():
            node = loader.get_node()
            if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG):
                continue
            tree = _from_yaml(node, loader, source, 0)
            policy, found = _Reader(source).document(tree)
            if policy.name in names:
                raise PolicyError(
                    source,
                    "metadata.name",
                    f"expected a unique name; {policy.name!r} is already used in this source",
                    _line_of(tree, "metadata", "name"),
                )
            names.add(policy.name)
            policies.append(policy)
            warnings.extend(found)
    except _AliasRefused as err:
        raise PolicyError(
            source, "", "expected no YAML aliases (*name); write the value out", err.line
        ) from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = None if mark is None else mark.line + 1
        raise PolicyError(source, "", f"expected valid YAML: {err.problem or err}", line) from err
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        raise PolicyError(
            source, "", f"expected printable text: character {err.character!r} is not", line
        ) from err
    except yaml.YAMLError as err:
        raise PolicyError(source, "", f"expected valid YAML: {err}") from err
    except RecursionError as err:
        raise PolicyError(source, "", f"expected at most {MAX_DEPTH} nested levels") from err
    finally:
        if loader is not None:
            loader.dispose()
    return ParseResult(tuple(policies), tuple(warnings))


def parse_policy_dict(data: object, source: str) -> ParseResult:
    """Parse one document already decoded from JSON or YAML (a policy stored by the server).

    Errors carry no line number; the key path still locates them. Raises ``PolicyError``.
    """
    policy, found = _Reader(source).document(_from_python(data, source, "", 0))
    return ParseResult((policy,), tuple(found))


def policy_to_dict(policy: Policy) -> dict[str, object]:
    """The document form of ``policy``; ``parse_policy_dict`` reads it back to an equal value."""
    spec: dict[str, object] = {"action": str(policy.action)}
    if policy.selector is not None:
        spec["selector"] = {"spiffe_ids": list(policy.selector)}
    if policy.dry_run:
        spec["dry_run"] = True
    spec["rules"] = [_rule_to_dict(rule) for rule in policy.rules]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": policy.name},
        "spec": spec,
    }


def _rule_to_dict(rule: Rule) -> dict[str, object]:
    out: dict[str, object] = {}
    if rule.from_:
        out["from"] = [{"source": _fields_to_dict(s, SOURCE_FIELDS)} for s in rule.from_]
    if rule.to:
        out["to"] = [{"operation": _fields_to_dict(o, OPERATION_FIELDS)} for o in rule.to]
    if rule.when:
        out["when"] = [_condition_to_dict(c) for c in rule.when]
    return out


def _fields_to_dict(value: object, names: tuple[str, ...]) -> dict[str, object]:
    return {name: list(getattr(value, name)) for name in names if getattr(value, name)}


def _condition_to_dict(condition: Condition) -> dict[str, object]:
    out: dict[str, object] = {"key": condition.key}
    if condition.values:
        out["values"] = list(condition.values)
    if condition.not_values:
        out["not_values"] = list(condition.not_values)
    return out


# -- decoding into located nodes --------------------------------------------------------------


def _from_yaml(node: yaml.Node, loader: yaml.SafeLoader, source: str, depth: int) -> _Node:
    line = node.start_mark.line + 1
    if depth > MAX_DEPTH:
        raise PolicyError(source, "", f"expected at most {MAX_DEPTH} nested levels", line)
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _MERGE_TAG:
            raise PolicyError(source, "", "expected no YAML merge keys (<<)", line)
        return _Node(loader.construct_object(node), line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_from_yaml(n, loader, source, depth + 1) for n in node.value], line)
    assert isinstance(node, yaml.MappingNode)  # the composer yields only these three kinds
    items: dict[str, _Node] = {}
    key_lines: dict[str, int | None] = {}
    for key_node, value_node in node.value:
        key_line = key_node.start_mark.line + 1
        key = _from_yaml(key_node, loader, source, depth + 1).value
        if not isinstance(key, str):
            raise PolicyError(source, "", f"expected string keys (got {_describe(key)})", key_line)
        if key in items:
            raise PolicyError(source, key, "expected each key once; it is repeated", key_line)
        items[key] = _from_yaml(value_node, loader, source, depth + 1)
        key_lines[key] = key_line
    return _Node(_Map(items, key_lines), line)


def _from_python(value: object, source: str, path: str, depth: int) -> _Node:
    if depth > MAX_DEPTH:
        raise PolicyError(source, path, f"expected at most {MAX_DEPTH} nested levels")
    if isinstance(value, Mapping):
        items: dict[str, _Node] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise PolicyError(source, path, f"expected string keys (got {_describe(key)})")
            items[key] = _from_python(item, source, _join(path, key), depth + 1)
        return _Node(_Map(items, dict.fromkeys(items)), None)
    if isinstance(value, list | tuple):
        return _Node(
            [_from_python(v, source, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)],
            None,
        )
    return _Node(value, None)


def _line_of(tree: _Node, *keys: str) -> int | None:
    node = tree
    for key in keys:
        if not isinstance(node.value, _Map) or key not in node.value.items:
            return node.line
        node = node.value.items[key]
    return node.line


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        _Map: "a mapping",
        type(None): "nothing",
    }
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, list | _Map):
        return kind
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{shown}, {kind}"


# -- reading the document ---------------------------------------------------------------------


class _Reader:
    """Walks one decoded document, builds the ``Policy`` and remembers the line of each path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int | None] = {}

    def fail(self, path: str, expected: str, line: int | None) -> NoReturn:
        raise PolicyError(self.source, path, expected, line)

    def document(self, tree: _Node) -> tuple[Policy, list[PolicyWarning]]:
        top = self.mapping(tree, "", ("apiVersion", "kind", "metadata", "spec"), required=True)
        api = self.string(top.items["apiVersion"], "apiVersion")
        if api != API_VERSION:
            self.fail(
                "apiVersion", f"expected {API_VERSION!r} (got {api!r})", self.lines["apiVersion"]
            )
        kind = self.string(top.items["kind"], "kind")
        if kind != KIND:
            self.fail("kind", f"expected {KIND!r} (got {kind!r})", self.lines["kind"])
        metadata = self.mapping(top.items["metadata"], "metadata", ("name",), required=True)
        name = self.string(metadata.items["name"], "metadata.name")
        spec_node = top.items["spec"]
        spec = self.mapping(spec_node, "spec", ("selector", "action", "dry_run", "rules"))

        selector: tuple[str, ...] | None = None
        if "selector" in spec.items:
            sel = self.mapping(spec.items["selector"], "spec.selector", ("spiffe_ids",), True)
            selector = self.strings(sel.items["spiffe_ids"], "spec.selector.spiffe_ids")
        action = Action.ALLOW
        if "action" in spec.items:
            text = self.string(spec.items["action"], "spec.action")
            if text not in Action.__members__:
                self.fail(
                    "spec.action",
                    f"expected ALLOW, DENY or AUDIT (got {text!r})",
                    spec.items["action"].line,
                )
            action = Action(text)
        dry_run = False
        if "dry_run" in spec.items:
            dry_run = self.boolean(spec.items["dry_run"], "spec.dry_run")
        rules: tuple[Rule, ...] = ()
        if "rules" in spec.items:
            rule_nodes = self.sequence(spec.items["rules"], "spec.rules", allow_empty=True)
            rules = tuple(self.rule(n, f"spec.rules[{i}]") for i, n in enumerate(rule_nodes))

        policy = Policy(name, selector, action, rules, dry_run)
        problems = policy_problems(policy)
        if problems:
            path, expected = problems[0]
            self.fail(path, expected, self.line_for(path))
        warnings = [
            PolicyWarning(self.source, path, message, self.line_for(path))
            for path, message in policy_warnings(policy)
        ]
        return policy, warnings

    def rule(self, node: _Node, path: str) -> Rule:
        rule = self.mapping(node, path, ("from", "to", "when"))
        sources: tuple[Source, ...] = ()
        operations: tuple[Operation, ...] = ()
        conditions: tuple[Condition, ...] = ()
        if "from" in rule.items:
            sources = tuple(
                self.source_entry(n, f"{path}.from[{i}]")
                for i, n in enumerate(self.sequence(rule.items["from"], f"{path}.from"))
            )
        if "to" in rule.items:
            operations = tuple(
                self.operation_entry(n, f"{path}.to[{i}]")
                for i, n in enumerate(self.sequence(rule.items["to"], f"{path}.to"))
            )
        if "when" in rule.items:
            conditions = tuple(
                self.condition(n, f"{path}.when[{i}]")
                for i, n in enumerate(self.sequence(rule.items["when"], f"{path}.when"))
            )
        return Rule(sources, operations, conditions)

    def source_entry(self, node: _Node, path: str) -> Source:
        entry = self.mapping(node, path, ("source",), required=True)
        where = f"{path}.source"
        fields = self.mapping(entry.items["source"], where, SOURCE_FIELDS)
        return Source(**{k: self.strings(v, f"{where}.{k}") for k, v in fields.items.items()})

    def operation_entry(self, node: _Node, path: str) -> Operation:
        entry = self.mapping(node, path, ("operation",), required=True)
        where = f"{path}.operation"
        fields = self.mapping(entry.items["operation"], where, OPERATION_FIELDS)
        values: dict[str, tuple[str, ...] | tuple[int, ...]] = {}
        for key, value in fields.items.items():
            if key in {"ports", "not_ports"}:
                values[key] = self.ports(value, f"{where}.{key}")
            else:
                values[key] = self.strings(value, f"{where}.{key}")
        return Operation(**values)  # type: ignore[arg-type]  # keys are Operation's fields

    def condition(self, node: _Node, path: str) -> Condition:
        cond = self.mapping(node, path, ("key", "values", "not_values"))
        if "key" not in cond.items:
            self.fail(path, "expected the key 'key' (the attribute to test)", node.line)
        key = self.string(cond.items["key"], f"{path}.key")
        lists = {
            name: self.strings(cond.items[name], f"{path}.{name}", numbers=True)
            for name in ("values", "not_values")
            if name in cond.items
        }
        return Condition(key, lists.get("values", ()), lists.get("not_values", ()))

    # -- typed readers ------------------------------------------------------------------------

    def mapping(
        self, node: _Node, path: str, allowed: tuple[str, ...], required: bool = False
    ) -> _Map:
        self.lines[path] = node.line
        if not isinstance(node.value, _Map):
            self.fail(path, f"expected a mapping (got {_describe(node.value)})", node.line)
        value = node.value
        for key, line in value.key_lines.items():
            if key not in allowed:
                self.fail(_join(path, key), _unknown_key(key, allowed), line)
            self.lines[_join(path, key)] = value.items[key].line
        if required:
            missing = [key for key in allowed if key not in value.items]
            if missing:
                self.fail(path, f"expected the key {missing[0]!r}", node.line)
        return value

    def sequence(self, node: _Node, path: str, allow_empty: bool = False) -> list[_Node]:
        self.lines[path] = node.line
        if not isinstance(node.value, list):
            self.fail(path, f"expected a list (got {_describe(node.value)})", node.line)
        if not node.value and not allow_empty:
            self.fail(path, "expected a non-empty list; omit the key instead", node.line)
        for index, item in enumerate(node.value):
            self.lines[f"{path}[{index}]"] = item.line
        return node.value

    def string(self, node: _Node, path: str) -> str:
        self.lines[path] = node.line
        if not isinstance(node.value, str):
            self.fail(path, f"expected a string (got {_describe(node.value)})", node.line)
        return node.value

    def boolean(self, node: _Node, path: str) -> bool:
        self.lines[path] = node.line
        if not isinstance(node.value, bool):
            self.fail(path, f"expected true or false (got {_describe(node.value)})", node.line)
        return node.value

    def strings(self, node: _Node, path: str, numbers: bool = False) -> tuple[str, ...]:
        """A non-empty list of strings; with ``numbers``, integers are read as their text."""
        out: list[str] = []
        for index, item in enumerate(self.sequence(node, path)):
            value = item.value
            if numbers and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                hint = "; quote it" if isinstance(value, int | float | bool) else ""
                self.fail(
                    f"{path}[{index}]",
                    f"expected a string (got {_describe(value)}){hint}",
                    item.line,
                )
            out.append(value)
        return tuple(out)

    def ports(self, node: _Node, path: str) -> tuple[int, ...]:
        out: list[int] = []
        for index, item in enumerate(self.sequence(node, path)):
            where = f"{path}[{index}]"
            value = item.value
            if not isinstance(value, int | str) or isinstance(value, bool):
                self.fail(where, f"expected a port number (got {_describe(value)})", item.line)
            out.append(self.checked(where, item.line, _syntax.parse_port, value))
        return tuple(out)

    def checked(
        self, path: str, line: int | None, parse: Callable[[int | str], int], value: int | str
    ) -> int:
        try:
            return parse(value)
        except ValueError as err:
            self.fail(path, str(err), line)

    def line_for(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest recorded parent."""
        while True:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                return self.lines.get("")
            path = path[:cut]


def _unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    message = f"unknown key {key!r}; expected one of {', '.join(allowed)}"
    snake = _CAMEL.sub("_", key).lower()
    if snake != key and snake in allowed:
        return f"{message} (keys are snake_case: did you mean {snake!r}?)"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=HINT_CUTOFF)
    return f"{message} (did you mean {close[0]!r}?)" if close else message
