"""shardq_operator: the kopf operator, the rebalancer that moves slots, and ``shardq up``."""
