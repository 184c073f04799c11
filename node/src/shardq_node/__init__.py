"""shardq_node: one storage node (engine, WAL, servers). Import ``Node`` from ``runtime``."""
