"""shardq_gateway: the stateless router in front of the nodes."""

# before any module of this package: compiled or interpreted (shardq.native decides)
import shardq.native  # noqa: F401
