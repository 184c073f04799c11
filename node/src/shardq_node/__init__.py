"""shardq_node: one storage node (engine, WAL, servers). Import ``Node`` from ``runtime``."""

# before any module of this package: compiled or interpreted (shardq.native decides)
import shardq.native  # noqa: F401
