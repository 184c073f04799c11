"""Settings of a node, grouped and documented field by field.

Built by the CLI from flags that are also environment variables (``SHARDQ_*``);
nothing here reads the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardq.wire.protocol import DEFAULT_MAX_LINE
from shardq_server.limits import Limits

from .engine_config import EngineConfig

FSYNC_POLICIES = ("always", "everysec", "never")


@dataclass
class StorageSettings:
    """Where and how a node keeps its state."""

    #: Directory for the WAL, snapshots and blobs; None = memory only (tests, benchmarks).
    data_dir: str | None = None
    #: ``always``: fsync before any reply that depends on the write (group commit);
    #: ``everysec``: fsync once a second; ``never``: leave it to the OS.
    fsync: str = "always"
    #: A WAL segment is closed and a new one started past this size.
    segment_bytes: int = 64 * 1024 * 1024
    #: A snapshot is written once the WAL since the last one passes this size.
    snapshot_bytes: int = 256 * 1024 * 1024
    #: Payloads larger than this go to the blob store on disk instead of memory.
    blob_threshold: int = 64 * 1024
    #: Memory budget for payloads kept in memory; past it, payloads go to disk.
    memory_budget: int = 1024 * 1024 * 1024
    #: Disk budget for the blob store; past it, pushes are refused (Queue full).
    disk_budget: int = 10 * 1024 * 1024 * 1024
    #: The largest payload accepted at all.
    max_payload: int = 8 * 1024 * 1024
    #: False = one write and fsync per command in the loop (no group commit): only for
    #: measuring what group commit gains.
    group_commit: bool = True
    #: After a write or fsync failed: how often to try whether the disk works again.
    retry_seconds: float = 2.0


@dataclass
class RequestLimits:
    """What one request may make a node keep or send back (docs/limits.md). The engine's
    own limits (queues, crons, retained results) are in ``EngineConfig``."""

    #: The largest ACK/ACKB ``result`` (bytes of JSON); None = ``storage.max_payload``.
    max_result: int | None = None
    #: The longest PROGRESS ``message`` and FAIL ``error`` (bytes of UTF-8); None =
    #: ``storage.max_payload``. Kept on the job, outside the memory budget.
    max_message: int | None = None
    #: The largest cron ``data`` (at most ``storage.max_payload``): kept in memory, and
    #: pushed again at every tick.
    max_cron_payload: int = 64 * 1024
    #: Queues in one LISTQUEUES answer (and in METRICS), by name; past it the answer's
    #: ``next`` names the last one, and ``after`` asks for the ones after it.
    max_list_queues: int = 10_000


@dataclass
class NodeSettings:
    """Everything ``shardq node`` takes (DESIGN §8)."""

    name: str = "node-0"
    host: str = "127.0.0.1"
    port: int = 6789
    #: 0 = no HTTP server.
    http_port: int = 6790
    #: Client tokens; empty = no authentication.
    tokens: tuple[str, ...] = ()
    #: Token for the internal cluster commands (slot moves, cross-node dependencies), never
    #: a client token. None with client ``tokens`` set: internal commands are refused; None
    #: with no client tokens either: an open node, anyone may run them (docs/security.md).
    cluster_token: str | None = None
    #: A request line longer than this is refused and its connection closed.
    max_line: int = DEFAULT_MAX_LINE
    #: The longest an HTTP pull waits for a job (ms).
    http_max_pull_wait_ms: int = 30_000
    #: Queues that get their own label in /metrics; the rest are summed as queue="_other".
    max_queue_labels: int = 1000
    #: False: no per-request counting or latency histograms on the hot path (the gauges and
    #: counters the engine keeps anyway are still exported); for measuring their cost.
    metrics: bool = True
    #: A replicated primary that has had fewer live members than a majority for this many
    #: seconds refuses writes (``Unavailable: shard S has no quorum``) instead of holding them.
    failure_timeout: float = 2.0
    #: Output budgets, backlogs, connection caps, HTTP timeouts, nesting (docs/limits.md).
    limits: Limits = field(default_factory=Limits)
    storage: StorageSettings = field(default_factory=StorageSettings)
    engine: EngineConfig = field(default_factory=EngineConfig)
    request_limits: RequestLimits = field(default_factory=RequestLimits)
