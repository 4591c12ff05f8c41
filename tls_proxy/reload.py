"""What a configuration reload changes: ``plan_reload`` compares the running ``ProxyConfig`` with
a newly read one and says what can be applied live and what needs a restart.

Pure: two validated configs in, a ``ReloadPlan`` out; ``Proxy.apply_config`` acts on it.

Applied live: listeners added, removed, moved to another address (the new socket is bound
before the old one stops accepting; the old one's connections drain) or changed in place
(``forward``, ``upstream``, ``expect_ids``, ``protocol``: new connections use them), and the
settings of the filters and codecs (``policy`` from a file, ``default_posture``, ``jwt``,
``access_log``, ``timeouts``, ``http``, ``debug``, ``log_level``). Needing a restart: whatever
decides who the proxy is or where it listens for its operator (``identity``, ``trust_domain``,
``admin``), the policy stream's server and trust, and every key this module does not know —
so a key added later is safe by default until its reload is written. A plan with restart keys
is refused as a whole: a reload applies entirely or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import InboundConfig, OutboundConfig, ProxyConfig

ListenerConfig = InboundConfig | OutboundConfig

# Top-level keys whose new value can be taken without a restart.
LIVE_KEYS = frozenset(
    {
        "inbound",
        "outbound",
        "policy",
        "jwt",
        "access_log",
        "timeouts",
        "http",
        "debug",
        "log_level",
        "default_posture",
    }
)
# Keys under a live key that still need a restart: the policy stream's connection.
RESTART_SUBKEYS = {"policy": ("server", "trust_bundle")}
# Changing these rebuilds the filter chain (new connections use the new one).
CHAIN_KEYS = frozenset({"access_log", "debug", "jwt"})


@dataclass(frozen=True)
class ReloadPlan:
    restart_keys: tuple[str, ...] = ()
    add: tuple[ListenerConfig, ...] = ()
    remove: tuple[str, ...] = ()
    move: tuple[ListenerConfig, ...] = ()  # same name, new ``listen``: bind anew, drain the old
    update: tuple[ListenerConfig, ...] = ()  # same name and address, other fields changed
    changed_keys: tuple[str, ...] = ()  # live top-level keys whose value changed

    @property
    def refused(self) -> bool:
        return bool(self.restart_keys)

    @property
    def empty(self) -> bool:
        return not (
            self.restart_keys
            or self.add
            or self.remove
            or self.move
            or self.update
            or self.changed_keys
        )

    @property
    def rebuild_chain(self) -> bool:
        return any(key in CHAIN_KEYS for key in self.changed_keys)

    def summary(self) -> dict[str, Any]:
        """For the log and ``/config``: names only."""
        return {
            "restart_keys": list(self.restart_keys),
            "added": [c.name for c in self.add],
            "removed": list(self.remove),
            "moved": [c.name for c in self.move],
            "updated": [c.name for c in self.update],
            "changed": list(self.changed_keys),
        }


def plan_reload(old: ProxyConfig, new: ProxyConfig) -> ReloadPlan:
    """What applying ``new`` over the running ``old`` takes."""
    before, after = old.public_dict(), new.public_dict()
    restart: list[str] = []
    changed: list[str] = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        if key not in LIVE_KEYS:
            restart.append(key)
            continue
        for sub in RESTART_SUBKEYS.get(key, ()):
            if (before.get(key) or {}).get(sub) != (after.get(key) or {}).get(sub):
                restart.append(f"{key}.{sub}")
        changed.append(key)
    add, remove, move, update = _listeners(
        [*old.inbound, *old.outbound], [*new.inbound, *new.outbound]
    )
    return ReloadPlan(
        restart_keys=tuple(restart),
        add=tuple(add),
        remove=tuple(remove),
        move=tuple(move),
        update=tuple(update),
        changed_keys=tuple(k for k in changed if k not in ("inbound", "outbound")),
    )


def _listeners(
    old: Sequence[ListenerConfig], new: Sequence[ListenerConfig]
) -> tuple[list[ListenerConfig], list[str], list[ListenerConfig], list[ListenerConfig]]:
    before: Mapping[str, ListenerConfig] = {c.name: c for c in old}
    add: list[ListenerConfig] = []
    remove: list[str] = []
    move: list[ListenerConfig] = []
    update: list[ListenerConfig] = []
    names = set()
    for config in new:
        names.add(config.name)
        previous = before.get(config.name)
        if previous is None or type(previous) is not type(config):
            if previous is not None:  # inbound became outbound or the reverse: a new listener
                remove.append(config.name)
            add.append(config)
        elif previous.listen != config.listen:
            move.append(config)
        elif previous != config:
            update.append(config)
    remove.extend(name for name in before if name not in names)
    return add, remove, move, update
