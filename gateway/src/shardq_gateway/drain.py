"""A gateway's graceful stop (SIGTERM): the drain, in three steps within one bound.

1. At once: ``/ready`` answers 503 (``Gateway.draining``), so Kubernetes takes the pod
   out of the Service's endpoints; everything is still served as before.
2. For ``drain_delay`` seconds it keeps accepting and serving as usual: endpoint removal
   reaches the nodes' kube-proxies a second or two late, and connections still arrive.
3. Then every client session drains (``ClientSession.drain``): the requests it has read
   are finished and answered; a later one runs only if it settles a job the client holds;
   any other is answered ``Unavailable: gateway draining, request not executed…``, which
   guarantees that it and everything sent after it on that connection were not run, and
   the connection half-closes. An idle session gets that line unasked (docs/protocol.md).
   A pull that waits is cut short the same way, but its node connection stays open: the
   jobs the client pulled over it stay leased for it to settle (through another gateway,
   with their tokens) until this gateway exits.
   The gateway stops once no session is left and no such connection is open, or at
   ``drain_timeout`` seconds after the signal, whichever comes first; what is left then
   is closed as ``Gateway.stop`` does (the nodes hand back the jobs still leased on it).

Must not: wait without the bound, or close a connection that has an answer on its way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .main import Gateway

log = logging.getLogger("shardq_gateway")

#: How often the drain looks whether the last session has gone.
POLL = 0.05


async def drain(gateway: Gateway) -> bool:
    """Drain ``gateway`` (it is stopped by the caller afterwards); True if every client
    session ended by itself within ``drain_timeout``."""
    s = gateway.settings
    deadline = time.monotonic() + s.drain_timeout
    gateway.draining = True
    log.info("draining: not ready; serving for %.1fs more, then closing connections "
             "(at most %.1fs in all)", s.drain_delay, s.drain_timeout)
    await asyncio.sleep(max(0.0, min(s.drain_delay, s.drain_timeout)))
    gateway.closing = True
    for session in list(gateway.sessions):
        session.drain()
    while time.monotonic() < deadline and (gateway.sessions or holds_pulls(gateway)):
        await asyncio.sleep(POLL)
    left = len(gateway.sessions)
    if left:
        log.warning("drain bound (%.1fs) reached with %d connections left: closing them",
                    s.drain_timeout, left)
    elif holds_pulls(gateway):
        log.info("drained; closing the node connections of clients' pulls at the bound")
    else:
        log.info("drained: every connection closed")
    return not left


def holds_pulls(gateway: Gateway) -> bool:
    return any(link.holds_pulls() for link in list(gateway.router.links.values()))
