"""Who may talk to a server: the one token check of nodes, gateways and the HTTP API
(docs/security.md).

``Tokens`` compares a token with every configured one in constant time (the time
taken does not tell which one matched, or how much of one did). ``Auth`` is the
``AUTH`` command's check: the client tokens let a connection run client commands;
the cluster token (a node's ``--cluster-token``; a gateway has none) also lets it
run the internal ones. With no client token configured any token is accepted, and a
connection starts authenticated (``required`` is False).

Must not: compare tokens with ``==``, or log a token.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from shardq.errors import InvalidRequest, InvalidToken


class Tokens:
    """A set of secrets; ``match`` checks a candidate against each of them."""

    __slots__ = ("known",)

    def __init__(self, tokens: Iterable[str]) -> None:
        self.known = tuple(t.encode() for t in tokens)

    def __bool__(self) -> bool:
        return bool(self.known)

    def match(self, token: object) -> bool:
        """Is ``token`` one of these? Every one is compared, so time does not tell which."""
        if type(token) is not str:
            return False
        given = token.encode()
        ok = False
        for known in self.known:
            ok |= hmac.compare_digest(given, known)
        return ok


class Auth:
    """The ``AUTH`` check of one server: its client tokens and its cluster token."""

    __slots__ = ("clients", "cluster")

    def __init__(self, tokens: Iterable[str] = (), cluster_token: str | None = None) -> None:
        self.clients = Tokens(tokens)
        self.cluster = Tokens((cluster_token,) if cluster_token else ())

    @property
    def required(self) -> bool:
        """Client tokens are configured: a new connection must ``AUTH`` before anything else."""
        return bool(self.clients)

    @property
    def open(self) -> bool:
        """Neither client nor cluster tokens: every caller may run internal commands."""
        return not self.clients and not self.cluster

    def client(self, token: object) -> bool:
        """A client token (any token when none is configured)?"""
        return not self.clients or self.clients.match(token)

    def check(self, token: object) -> bool:
        """``AUTH {token}``: True for the cluster token, False for a client token; raises
        ``InvalidRequest`` without a token and ``InvalidToken`` for a wrong one."""
        if token is None:
            raise InvalidRequest("missing field 'token'")
        if self.cluster and self.cluster.match(token):
            return True
        if not self.client(token):
            raise InvalidToken()
        return False
