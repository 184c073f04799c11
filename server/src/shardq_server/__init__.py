"""shardq_server: what both servers (node and gateway) share and the client never imports.

The HTTP API's routes and OpenAPI document, the process runner (uvloop, signals) and the
cheap hot-path histogram. Must not: import ``shardq_node`` or ``shardq_gateway``.
"""

# before any module of this package: compiled or interpreted (shardq.native decides)
import shardq.native  # noqa: F401
