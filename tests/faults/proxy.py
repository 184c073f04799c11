"""A TCP proxy on loopback in front of one node, whose links fail on command, per source IP.

The fault harness publishes each node's proxy address in the topology instead of
the node's own, so every connection to a node (from the gateway, the other nodes,
the controller, the coordinator) passes a ``Proxy``. Every process of the cluster
dials from its own loopback address, so the proxy tells them apart by the source
IP of a connection and applies that source's rule (or the ``"*"`` rule):

- **pass** (no rule, or after ``heal``): bytes go through as they come;
- **cut**: existing connections are aborted (RST) and new ones are aborted as soon
  as they are accepted;
- **black-hole**: connections are accepted but nothing is forwarded either way (a new
  connection is not even opened to the node); what was sent is held, as TCP would
  retransmit it, and flows once the rule is lifted. Past ``HOLD_LIMIT`` held bytes the
  proxy stops reading from that sender, so its own buffers fill like a real one's;
- **delay**: every chunk is forwarded ``seconds`` after it arrived, in order.

Nothing here runs a task per chunk: two protocol objects per proxied connection and
one timer per direction at most; ``close()`` aborts every connection and waits for
the connect attempts it started, so a proxy leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, cast

RuleKind = Literal["pass", "cut", "blackhole", "delay"]
ANY = "*"
#: Bytes held (black-holed or delayed) per direction before reading that side pauses.
HOLD_LIMIT = 4 * 1024 * 1024
#: Bound on opening the connection to the node.
CONNECT_TIMEOUT = 2.0

TO_NODE = 0
TO_CLIENT = 1


@dataclass(frozen=True)
class Rule:
    kind: RuleKind = "pass"
    delay: float = 0.0


PASS = Rule()


@dataclass
class ProxyStats:
    accepted: int = 0  # connections accepted (whatever happened next)
    aborted: int = 0  # connections aborted by a cut (at accept or later)
    failed_upstream: int = 0  # the node refused or did not answer the connect
    bytes: list[int] = field(default_factory=lambda: [0, 0])  # forwarded, per direction


class _Side(asyncio.Protocol):
    """One end of a proxied connection; everything it receives goes to its ``Link``."""

    def __init__(self, link: Link, direction: int) -> None:
        self.link = link
        self.direction = direction  # the direction of what this side *receives from its peer*
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.link.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.link.forward(self.direction, data)

    def eof_received(self) -> bool:
        return False  # close this side; the link closes the other once its bytes are out

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.side_lost(self)

    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()


class Link:
    """One proxied connection: the client's side, the node's side, and what is held."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.source = ""
        self.client = _Side(self, TO_NODE)
        self.node: _Side | None = None
        self.pending: tuple[deque[tuple[float, bytes]], deque[tuple[float, bytes]]] = (
            deque(), deque())
        self.held = [0, 0]
        self.timers: list[asyncio.TimerHandle | None] = [None, None]
        self.connecting: asyncio.Task[None] | None = None
        self.ended = [False, False]  # per direction: its sender is gone
        self.closed = False

    # -- both ends ------------------------------------------------------------------------------

    def side_made(self, side: _Side) -> None:
        if side is not self.client:
            return
        assert side.transport is not None
        peer = side.transport.get_extra_info("peername")
        self.source = str(peer[0]) if peer else ""
        self.proxy.stats.accepted += 1
        self.proxy.links.add(self)
        self.rule_changed()

    def side_lost(self, side: _Side) -> None:
        """A side closed: what it sent still goes out (under the rule), then the other side
        is closed; what the other side sends from then on is dropped."""
        if self.closed:
            return
        self.ended[side.direction] = True
        self._flush(side.direction)
        self._flush(TO_CLIENT if side.direction == TO_NODE else TO_NODE)
        if not self.client.open() and (self.node is None or not self.node.open()):
            self.close()

    def _receiver(self, direction: int) -> _Side | None:
        return self.node if direction == TO_NODE else self.client

    def _sender(self, direction: int) -> _Side | None:
        return self.client if direction == TO_NODE else self.node

    def rule(self) -> Rule:
        return self.proxy.rule_for(self.source)

    def rule_changed(self) -> None:
        if self.closed:
            return
        rule = self.rule()
        if rule.kind == "cut":
            self.proxy.stats.aborted += 1
            self.abort()
            return
        if rule.kind != "blackhole" and self.node is None and self.connecting is None:
            self.connecting = asyncio.get_running_loop().create_task(self._connect())
            self.proxy.tasks.add(self.connecting)
            self.connecting.add_done_callback(self.proxy.tasks.discard)
        self._flush(TO_NODE)
        self._flush(TO_CLIENT)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.proxy.target
        side = _Side(self, TO_CLIENT)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: side, host, port),
                                   CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            self.proxy.stats.failed_upstream += 1
            self.abort()  # as if the node itself refused: the client sees its connection reset
            return
        if self.closed:
            if side.transport is not None:
                side.transport.abort()
            return
        self.node = side
        self._flush(TO_NODE)
        self._flush(TO_CLIENT)

    # -- bytes ----------------------------------------------------------------------------------

    def forward(self, direction: int, data: bytes) -> None:
        if self.closed:
            return
        rule = self.rule()
        if rule.kind == "cut":
            self.proxy.stats.aborted += 1
            self.abort()
            return
        due = asyncio.get_running_loop().time() + (rule.delay if rule.kind == "delay" else 0.0)
        self.pending[direction].append((due, data))
        self.held[direction] += len(data)
        sender = self._sender(direction)
        if self.held[direction] > HOLD_LIMIT and sender is not None and sender.open():
            assert sender.transport is not None
            sender.transport.pause_reading()
            sender.paused = True
        self._flush(direction)

    def _flush(self, direction: int) -> None:
        """Write what is due in ``direction`` (nothing while black-holed); close the receiving
        side once its sender is gone and nothing is left for it."""
        if self.closed:
            return
        receiver = self._receiver(direction)
        queue = self.pending[direction]
        loop = asyncio.get_running_loop()
        if receiver is not None and not receiver.open() and receiver.transport is not None:
            queue.clear()  # the receiver is gone: nothing can reach it any more
            self.held[direction] = 0
        elif receiver is not None and self.rule().kind != "blackhole":
            assert receiver.transport is not None
            now = loop.time()
            out = []
            while queue and queue[0][0] <= now:
                data = queue.popleft()[1]
                out.append(data)
                self.held[direction] -= len(data)
            if out:
                receiver.transport.write(b"".join(out))
                self.proxy.stats.bytes[direction] += sum(map(len, out))
            sender = self._sender(direction)
            if sender is not None and sender.paused and self.held[direction] <= HOLD_LIMIT // 2:
                sender.paused = False
                if sender.open():
                    assert sender.transport is not None
                    sender.transport.resume_reading()
            if queue and self.timers[direction] is None:
                self.timers[direction] = loop.call_at(queue[0][0], self._timer, direction)
        if self.ended[direction] and not queue and receiver is not None and receiver.transport:
            receiver.transport.close()  # writes what it still buffers, then closes

    def _timer(self, direction: int) -> None:
        self.timers[direction] = None
        self._flush(direction)

    # -- ending ---------------------------------------------------------------------------------

    def abort(self) -> None:
        for side in (self.client, self.node):
            if side is not None and side.transport is not None:
                side.transport.abort()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for i, timer in enumerate(self.timers):
            if timer is not None:
                timer.cancel()
                self.timers[i] = None
        for side in (self.client, self.node):
            if side is not None and side.transport is not None:
                side.transport.close()
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        self.proxy.links.discard(self)


class Proxy:
    """Listens on ``listen_host`` (a free port unless given) and forwards to ``target``."""

    def __init__(self, name: str, listen_host: str, target: tuple[str, int]) -> None:
        self.name = name
        self.listen_host = listen_host
        self.target = target
        self.rules: dict[str, Rule] = {}
        self.links: set[Link] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stats = ProxyStats()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    async def start(self, port: int = 0) -> Proxy:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Link(self).client, self.listen_host,
                                                port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening, abort every connection, and wait for the connects in flight."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self.links):
            link.abort()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await asyncio.wait_for(server.wait_closed(), 5)

    # -- rules ----------------------------------------------------------------------------------

    def rule_for(self, source: str) -> Rule:
        return self.rules.get(source) or self.rules.get(ANY) or PASS

    def _set(self, rule: Rule | None, sources: tuple[str, ...]) -> None:
        for source in sources or (ANY,):
            if rule is None:
                self.rules.pop(source, None)
            else:
                self.rules[source] = rule
        for link in list(self.links):
            link.rule_changed()

    def cut(self, *sources: str) -> None:
        """Abort every connection from ``sources`` (all when none) and refuse new ones."""
        self._set(Rule("cut"), sources)

    def blackhole(self, *sources: str) -> None:
        """Accept but forward nothing from or to ``sources`` (held until healed)."""
        self._set(Rule("blackhole"), sources)

    def delay(self, seconds: float, *sources: str) -> None:
        """Forward everything from or to ``sources`` ``seconds`` late."""
        self._set(Rule("delay", seconds), sources)

    def heal(self, *sources: str) -> None:
        """Lift the rules of ``sources``; with none, every rule."""
        if not sources:
            self.rules.clear()
        self._set(None, sources)
