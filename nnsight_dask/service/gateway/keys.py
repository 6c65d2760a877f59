"""Who may call the gateway: users and their API keys, read from the operator's ``keys.toml``.

.. code-block:: toml

    [users.alice]
    key_sha256 = "9f86d08..."   # sha256 of the key, hex (preferred: the file then holds no secret)
    max_concurrent = 4          # experiments queued or running at once (default: gateway_max_concurrent)
    deployments = ["smol"]      # optional allow list (default: every deployment)
    stores = ["s3://lab/alice/"]  # optional: where else alice's saves may go (default: only her
                                  # prefix of the gateway's result store)

    [users.bob]
    key = "plain-text key"      # accepted, but anyone who reads the file can then act as bob

Keys are compared as sha256 digests with :func:`hmac.compare_digest`, against every user's digest,
so the time an answer takes says nothing about how much of a key was right, nor which user matched.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import config
from ...storage.location import normalize_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

#: Fields a user's table may hold (anything else is refused: a typo must not silently widen a limit).
_FIELDS = ("key_sha256", "key", "max_concurrent", "deployments", "stores")
#: A user's name: it names the user's prefix in the result store, so no path separators or dots alone.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass(frozen=True)
class User:
    """An authenticated caller of the gateway and its limits."""

    name: str
    key_sha256: str
    max_concurrent: int
    deployments: frozenset[str] | None = None
    #: Store URL prefixes where the user's saves may go besides their prefix of the result store.
    stores: tuple[str, ...] = ()

    def may_use(self, deployment: str) -> bool:
        return self.deployments is None or deployment in self.deployments


def hash_key(key: str) -> str:
    """The hex sha256 of an API key: what ``key_sha256`` in keys.toml holds."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


class KeyRing:
    """The users of a gateway; :meth:`authenticate` turns an ``Authorization`` header into a :class:`User`."""

    def __init__(self, users: Iterable[User]) -> None:
        self.users = {user.name: user for user in users}
        digests = [user.key_sha256 for user in self.users.values()]
        if len(set(digests)) != len(digests):
            raise ValueError("two users of the gateway have the same API key")

    @classmethod
    def from_toml(cls, path: str | Path) -> KeyRing:
        """Read ``keys.toml`` (see the module docstring); a clear error names what is wrong and where."""
        with open(path, "rb") as file:
            data = tomllib.load(file)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "keys") -> KeyRing:
        users = data.get("users")
        if not isinstance(users, Mapping) or not users:
            raise ValueError(f"{source}: no [users.<name>] tables: the gateway would let nobody in")
        return cls(_user(name, table, source) for name, table in users.items())

    def authenticate(self, authorization: str | None) -> User | None:
        """The user whose key is in ``Authorization: Bearer <key>``, or None."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hash_key(key.strip())
        found = None
        for user in self.users.values():  # no early exit: every answer takes as long
            if hmac.compare_digest(digest, user.key_sha256):
                found = user
        return found


def _user(name: str, table: Any, source: str) -> User:
    where = f"{source}: [users.{name}]"
    if not _NAME.fullmatch(name):
        raise ValueError(f"{where}: a user's name is 1-64 letters, digits and '_.@-', starting with a letter or "
                         "digit (it names the user's prefix in the result store)")
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table")
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {list(_FIELDS)}")
    if ("key" in table) == ("key_sha256" in table):
        raise ValueError(f"{where}: give exactly one of key_sha256 (preferred) or key")
    digest = table["key_sha256"] if "key_sha256" in table else hash_key(str(table["key"]))
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
        raise ValueError(f"{where}: key_sha256 must be 64 hex digits (nnsight-dask gateway --new-key prints one)")
    limit = table.get("max_concurrent", config.gateway_max_concurrent)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"{where}: max_concurrent must be a positive integer, not {limit!r}")
    allowed = table.get("deployments")
    if allowed is not None and (not isinstance(allowed, list) or not all(isinstance(d, str) for d in allowed)):
        raise ValueError(f"{where}: deployments must be a list of deployment names")
    stores = table.get("stores", [])
    if not isinstance(stores, list) or not all(isinstance(s, str) and s for s in stores):
        raise ValueError(f"{where}: stores must be a list of store URL prefixes")
    return User(name, digest.lower(), limit, None if allowed is None else frozenset(allowed),
                tuple(normalize_url(s) for s in stores))
