"""Settings of a gateway, grouped and documented field by field.

Built by the CLI from flags that are also environment variables (``SHARDQ_*``);
nothing here reads the environment itself, opens a socket or knows a node's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardq.wire.protocol import DEFAULT_MAX_LINE
from shardq_server.limits import Limits


@dataclass
class GatewaySettings:
    """Everything ``shardq gateway`` takes (DESIGN §8)."""

    host: str = "127.0.0.1"
    #: TCP port of the line protocol (0 = any free port; see ``Gateway.port``).
    port: int = 6789
    #: HTTP port of the API and the dashboard (0 = no HTTP server).
    http_port: int = 6790
    #: Nodes (``host:port`` of their TCP servers) to load the topology from at start.
    seeds: list[str] = field(default_factory=lambda: ["127.0.0.1:6800"])
    #: Client tokens of this gateway; empty = no authentication.
    tokens: tuple[str, ...] = ()
    #: Token the gateway sends to the nodes (``AUTH``) on each connection it opens;
    #: None = the first of ``tokens`` (nothing is sent when both are empty). A client token
    #: of the nodes is enough: the gateway runs no internal command.
    cluster_token: str | None = None
    #: Shared pipelined connections per node; a client session always uses the same one
    #: for a node, so its requests to one node are executed in the order it sent them.
    upstream_connections: int = 2
    #: How long a request refused with ``TRYAGAIN`` (slot frozen by a move) or ``MOVED``
    #: is retried before the client gets ``Unavailable: …``.
    retry_budget: float = 5.0
    #: Bound on opening a connection to a node (and on topology queries).
    connect_timeout: float = 2.0
    #: A PULL without ``timeout`` is sent to its node with this timeout (ms) and sent again
    #: each time it comes back empty, until a job comes or the client leaves.
    pull_chunk_ms: int = 30_000
    #: Ask the nodes for a newer topology this often (s); 0 = only when a node says MOVED.
    topology_poll: float = 2.0
    #: How long ``start`` keeps asking the seeds for a topology before giving up.
    startup_timeout: float = 60.0
    #: A request line longer than this is refused and its connection closed, like a node.
    #: Keep it at or below the nodes' ``--max-line``: a node closes a connection that sends
    #: a longer line, and the gateway's connections to a node are shared by its clients.
    max_line: int = DEFAULT_MAX_LINE
    #: Requests of one client in flight at once; past this, reading from it pauses.
    max_inflight: int = 20_000
    #: SIGTERM: how long the gateway goes on accepting and serving as usual once ``/ready``
    #: fails (s), while Kubernetes takes it out of the Service's endpoints (drain.py).
    drain_delay: float = 5.0
    #: SIGTERM: the bound (s) from the signal to the exit; keep it below the pod's
    #: ``terminationGracePeriodSeconds`` (the operator sets 30).
    drain_timeout: float = 20.0
    #: Output budgets, backlogs, connection caps, HTTP timeouts, nesting (docs/limits.md).
    limits: Limits = field(default_factory=Limits)

    def node_token(self) -> str | None:
        """The token sent to nodes: ``cluster_token``, else the first client token."""
        if self.cluster_token:
            return self.cluster_token
        return self.tokens[0] if self.tokens else None
