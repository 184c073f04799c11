"""Requests in flight through the gateway, from routing to the answer a client gets.

Each request becomes one ``Pending``, added to its ``Client`` (clients.py): a TCP
session keeps them in a FIFO and writes answers from the front as they fill in, so
a client sees its answers in request order whichever node answered first; an
in-process HTTP call waits for its one answer. ``forward``, ``split``, ``fan_out``
and ``local`` start each kind for a client (routes.py calls them).

- ``Forward``: a request one node answers (queue and id commands, PUSHB and
  PULLB too: they name one queue). The original line goes out and the node's
  answer comes back, both byte for byte. ``MOVED`` makes it re-read the topology
  and go to the new owner; ``TRYAGAIN`` retries after a short, growing pause;
  both within the retry budget, after which the client gets
  ``Unavailable: slot N is moving, try again``.
- ``Split``: ACKB and RELEASE, whose ids may belong to several nodes: one request
  per owner carrying that owner's share of every per-id field (``results``,
  ``leases``), the counts summed (``{"ok":true,"ids":[sum]}``).
- ``FanOut``: a cluster-wide read sent to every node and merged (merge.py).

Must not: block, answer out of order, or re-encode a line it can forward as is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardq.errors import GatewayDraining, ShardqError, Unavailable
from shardq.wire.retry import ERROR_PREFIX, MOVED, TRYAGAIN, Retry, refusal
from shardq.wire.slots import SLOTS

if TYPE_CHECKING:
    from .clients import Client
    from .router import Router
    from .upstream import NodeLink

log = logging.getLogger("shardq_gateway")

#: Forward flags.
BLOCKING = 1  # a PULL/PULLB that may wait: on the client's dedicated connection
FOREVER = 2  # the client gave no timeout: send again each time it comes back empty
TRACK = 4  # a non-blocking pull on a shared connection: remember the leased ids

#: A blocked pull refused after waiting this long had been accepted: its budget starts over.
ACCEPTED_AFTER = 1.0

OK_PREFIX = b'{"ok":true'
EMPTY_PULL = (b'{"ok":true,"job":null', b'{"ok":true,"jobs":[]')


def error_line(text: str, rid: str | int | None) -> bytes:
    """``{"ok":false,"error":text[,"reqId"]}`` without its newline (as a node writes it)."""
    if rid is None:
        return orjson.dumps({"ok": False, "error": text})
    return orjson.dumps({"ok": False, "error": text, "reqId": rid})


def answer_line(answer: dict[str, Any], rid: str | int | None) -> bytes:
    if rid is not None:
        answer["reqId"] = rid
    return orjson.dumps(answer)


#: The answer of a request a draining gateway did not run (nor any after it on that connection).
DRAINING = GatewayDraining().text


def moving(slot: int) -> str:
    return Unavailable(f"slot {slot} is moving, try again").text


class Pending:
    """One answer a client waits for, in its place of the order (``answer`` has no newline).

    ``cmd`` and ``started`` are set by the client for the gateway's metrics, ``cost``
    (the request line's bytes, held while it is in flight) for its output budget."""

    __slots__ = ("answer", "cmd", "cost", "started")

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer
        self.cmd: str | None = None
        self.started = 0.0
        self.cost = 0


def schedule(retry: Retry, router: Router, kind: int, epoch: int,
             then: Callable[[], None]) -> bool:
    """Plan the next attempt of a refused request (the policy of shardq.wire.retry: after
    MOVED the topology is read again first); False when the budget is spent."""
    moved = kind == MOVED and epoch > router.epoch
    pause = retry.moved_pause() if moved else retry.pause()
    if pause is None:
        router.metrics.retry("timeout")
        return False
    router.metrics.retry("MOVED" if kind == MOVED else "TRYAGAIN")
    loop = asyncio.get_running_loop()
    if moved:
        if pause == 0:
            router.refresh(epoch, then)
        else:  # refreshed before and still behind: do not spin
            loop.call_later(pause, router.refresh, epoch, then)
    else:
        loop.call_later(pause, then)
        if kind == TRYAGAIN:
            router.look_again()
    return True


def accepted(retry: Retry) -> bool:
    """Was the refused attempt first accepted (a pull that waited before the move came)?"""
    return time.monotonic() - retry.sent > ACCEPTED_AFTER


class Forward(Pending):
    """A request for the owner of one slot; line and answer pass through unchanged."""

    __slots__ = ("client", "delivered", "flags", "line", "looked", "retry", "rid", "slot")

    def __init__(
        self, client: Client, line: bytes, slot: int, rid: str | int | None, flags: int
    ) -> None:
        self.answer = None
        self.client = client
        self.line = line
        self.slot = slot
        self.rid = rid
        self.flags = flags
        self.retry: Retry | None = None
        self.looked = False  # the topology was read again once after the owner did not answer
        #: written to a node whose connection then dropped: it may have run, so it is
        #: answered with the error, never sent again (a retried PUSH could make a duplicate)
        self.delivered = False

    def dispatch(self) -> None:
        client = self.client
        if client.closing or self.answer is not None:  # (answered: cut short by the drain)
            return
        link = client.router.by_slot[self.slot]
        if self.retry is not None:
            self.retry.sent = time.monotonic()
        if link is None:
            if client.router.topology.shards:  # a failover is choosing its primary
                self._again(TRYAGAIN, 0)
                return
            self.unavailable(Unavailable(f"slot {self.slot} has no owner").text)
        elif self.flags & BLOCKING:
            conn = client.dedicated(link)
            if conn is None:
                self.unavailable(link.unreachable())
            else:
                conn.send(self)
        else:
            link.send(self, client.index)

    def done(self, answer: bytes) -> None:
        if self.answer is not None:  # cut short by the drain: what its pull leased stays with
            return  # that node connection, handed back when the gateway exits
        if answer.startswith(ERROR_PREFIX):
            why = refusal(answer)
            if why is not None:
                self._again(*why)
                return
        elif self.flags:
            if self.flags & FOREVER and answer.startswith(EMPTY_PULL):
                if self.client.draining:  # it leased nothing: say so rather than wait again
                    self.cut_short()
                else:
                    self.dispatch()
                return
            if self.flags & TRACK:
                self.client.took(answer)
        self.finish(answer)

    def _again(self, kind: int, epoch: int) -> None:
        retry = self.retry
        if retry is None:
            retry = self.retry = Retry(self.client.router.settings.retry_budget)
            self.client.retry_begin()
        elif self.flags & BLOCKING and accepted(retry):
            retry.restart()
        if not schedule(retry, self.client.router, kind, epoch, self.dispatch):
            self.finish(error_line(moving(self.slot), self.rid))

    def unavailable(self, text: str) -> None:
        """The owner did not answer: read the topology again once (its pod may have moved
        to a new address, published meanwhile) and send there; else the clear error. A
        request written to the owner before its connection dropped may have run (its
        record may even live on in a follower that becomes primary): never sent again,
        the client is told it may have been applied."""
        if self.answer is not None:
            return  # cut short by the drain already
        if self.flags & BLOCKING and self.client.draining:
            self.cut_short()  # its node connection closed: the node released what it leased
            return
        if self.delivered:  # the node may have run it: say so (an unknown outcome)
            self.finish(error_line(f"{text}; the request may have been applied", self.rid))
            return
        router = self.client.router
        link = router.by_slot[self.slot]
        if router.replicated(self.slot):
            # the controller replaces a lost primary: wait for it (a request never sent)
            retry = self.retry
            if retry is None or not retry.spent():
                self._again(TRYAGAIN, 0)
                return
        if not self.looked and link is not None:
            self.looked = True
            if router.reread(link, lambda: self._after_reread(link, text)):
                return
        self.finish(error_line(text, self.rid))

    def cut_short(self) -> None:
        """A draining gateway ends a pull that may wait: the client gets nothing from it, so
        for the client it was not run. Its node connection stays open until the gateway
        exits (the jobs the client pulled over it earlier stay leased meanwhile, for it to
        settle); a job the node leases on it from now on is handed back then."""
        self.finish(error_line(DRAINING, self.rid))
        self.client.farewell()

    def _after_reread(self, before: NodeLink, text: str) -> None:
        if self.client.closing:
            return
        if self.client.router.by_slot[self.slot] is not before:
            self.dispatch()  # a new owner, or the same node at a new address
        else:
            self.finish(error_line(text, self.rid))

    def finish(self, answer: bytes) -> None:
        self.answer = answer
        client = self.client
        if self.retry is not None:
            self.retry = None
            client.retry_end()
        if self.flags & BLOCKING:
            client.pull_done()
        client.ready(self)


#: Per-id fields of ACKB and RELEASE: one entry per id, split along with the ids.
Fields = dict[str, list[Any]]


class _Part:
    """One owner's share of a Split."""

    __slots__ = ("fields", "ids", "line", "split")

    def __init__(self, split: Split, ids: list[int], fields: Fields, line: bytes | None) -> None:
        self.split = split
        self.ids = ids
        self.fields = fields
        if line is None:
            line = orjson.dumps({"cmd": split.cmd, "ids": ids, **fields})
        self.line = line

    def done(self, answer: bytes) -> None:
        self.split.part_done(self, answer)

    def unavailable(self, text: str) -> None:
        self.split.part_failed(text)


class Split(Pending):
    """ACKB or RELEASE across owners: one request per owner, the counts summed.

    The per-id fields (``results``, ``leases``) are split along with the ids, so each
    node gets the lease token of every id it settles.

    If one owner refuses (other than for a move) the client gets that error; the
    other owners' ids may have been acked meanwhile, as after a lost connection.
    ``client`` is None for the RELEASE a client that left leaves behind.
    """

    __slots__ = ("client", "cmd", "count", "error", "left", "retry", "rid", "router")

    def __init__(
        self, router: Router, client: Client | None, cmd: str, rid: str | int | None
    ) -> None:
        self.answer = None
        self.router = router
        self.client = client
        self.cmd = cmd
        self.rid = rid
        self.count = 0
        self.left = 0
        self.error: str | None = None
        self.retry: Retry | None = None

    def start(self, ids: list[int], fields: Fields, line: bytes | None) -> None:
        """Send the ids; ``line`` (the client's own) is sent as is when one node owns them all."""
        self.left = 1
        self._send(ids, fields, line)
        self._one_done()

    def _send(self, ids: list[int], fields: Fields, line: bytes | None) -> None:
        groups = self._group(ids, fields)
        index = self.client.index if self.client is not None else 0
        for link, (part_ids, part_fields) in groups.items():
            self.left += 1
            if link is None:
                self.part_failed(Unavailable(f"slot {part_ids[0] % SLOTS} has no owner").text)
                continue
            link.send(_Part(self, part_ids, part_fields, line if len(groups) == 1 else None),
                      index)

    def _group(
        self, ids: list[int], fields: Fields
    ) -> dict[NodeLink | None, tuple[list[int], Fields]]:
        by_slot = self.router.by_slot
        groups: dict[NodeLink | None, tuple[list[int], Fields]] = {}
        for i, job_id in enumerate(ids):
            link = by_slot[job_id % SLOTS]
            group = groups.get(link)
            if group is None:
                group = groups[link] = ([], {name: [] for name in fields})
            group[0].append(job_id)
            for name, values in fields.items():
                group[1][name].append(values[i])
        return groups

    def part_done(self, part: _Part, answer: bytes) -> None:
        if answer.startswith(OK_PREFIX):
            counts = orjson.loads(answer).get("ids") or [0]
            self.count += int(counts[0])
            self._one_done()
            return
        why = refusal(answer)
        if why is None:
            self.part_failed(str(orjson.loads(answer).get("error")))
            return
        if self.retry is None:
            self.retry = Retry(self.router.settings.retry_budget)
            if self.client is not None:
                self.client.retry_begin()
        if not schedule(self.retry, self.router, why[0], why[1], lambda: self._resend(part)):
            self.part_failed(moving(part.ids[0] % SLOTS))

    def _resend(self, part: _Part) -> None:
        if self.client is not None and self.client.closing and self.cmd != "RELEASE":
            self._one_done()
            return
        self._send(part.ids, part.fields, None)
        self._one_done()

    def part_failed(self, text: str) -> None:
        if self.error is None:
            self.error = text
        self._one_done()

    def _one_done(self) -> None:
        self.left -= 1
        if self.left:
            return
        if self.error is not None:
            answer = error_line(self.error, self.rid)
        else:
            answer = answer_line({"ok": True, "ids": [self.count]}, self.rid)
        self.answer = answer
        client = self.client
        if client is None:
            if self.error is not None and not self.router.closing:
                log.warning("%s after a client left: %s", self.cmd, self.error)
            return
        if self.retry is not None:
            self.retry = None
            client.retry_end()
        client.ready(self)


Merge = Callable[[list[tuple[str, dict[str, Any]]], "Router"], dict[str, Any]]


class _FanPart:
    __slots__ = ("fan", "i", "line")

    def __init__(self, fan: FanOut, i: int, line: bytes) -> None:
        self.fan = fan
        self.i = i
        self.line = line

    def done(self, answer: bytes) -> None:
        self.fan.part(self.i, orjson.loads(answer))

    def unavailable(self, text: str) -> None:
        self.fan.part(self.i, {"ok": False, "error": text})


class FanOut(Pending):
    """A cluster-wide read: the same line to every node, the answers merged."""

    __slots__ = ("answers", "client", "left", "merge", "names", "rid")

    def __init__(self, client: Client, merge: Merge, rid: str | int | None) -> None:
        self.answer = None
        self.client = client
        self.merge = merge
        self.rid = rid
        self.left = 0
        self.names: list[str] = []
        self.answers: list[dict[str, Any]] = []

    def start(self, line: bytes) -> None:
        links = self.client.router.members
        if not links:
            self.finish(error_line(Unavailable("the topology names no nodes").text, self.rid))
            return
        self.names = [link.name for link in links]
        self.answers = [{} for _ in links]
        self.left = len(links)
        index = self.client.index
        for i, link in enumerate(links):
            link.send(_FanPart(self, i, line), index)

    def part(self, i: int, answer: dict[str, Any]) -> None:
        self.answers[i] = answer
        self.left -= 1
        if self.left:
            return
        try:
            merged = self.merge(list(zip(self.names, self.answers, strict=True)),
                                self.client.router)
        except ShardqError as exc:
            self.finish(error_line(exc.text, self.rid))
            return
        except Exception as exc:  # a node answered something unexpected: say so, go on
            log.exception("cannot merge the nodes' answers")
            text = Unavailable(f"the nodes' answers could not be merged ({exc!r})").text
            self.finish(error_line(text, self.rid))
            return
        self.finish(answer_line(merged, self.rid))

    def finish(self, answer: bytes) -> None:
        self.answer = answer
        self.client.ready(self)


# -- starting a request for a client --------------------------------------------------------------


def forward(client: Client, line: bytes, slot: int, rid: str | int | None, flags: int) -> None:
    """To the owner of ``slot``: ``line`` as is (``flags``: BLOCKING, FOREVER, TRACK)."""
    call = Forward(client, line, slot, rid, flags)
    client.add(call)
    if flags & BLOCKING:
        client.pull_begin()
    link = client.router.by_slot[slot]
    if link is None or flags:
        call.dispatch()
    else:
        link.send(call, client.index)  # the common case of Forward.dispatch


def split(client: Client, cmd: str, ids: list[int], fields: Fields, rid: str | int | None,
          line: bytes) -> None:
    """ACKB, RELEASE: each owner its share of ``ids`` and of the per-id ``fields``."""
    call = Split(client.router, client, cmd, rid)
    client.add(call)
    call.start(ids, fields, line)


def fan_out(client: Client, line: bytes, merge: Merge, rid: str | int | None) -> None:
    """To every node, the answers merged."""
    call = FanOut(client, merge, rid)
    client.add(call)
    call.start(line)


def local(client: Client, answer: bytes) -> None:
    """An answer the gateway gives itself, in its place in the order."""
    call = Pending(answer)
    client.add(call)
    client.ready(call)
