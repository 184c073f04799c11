"""shardq.operator: the kopf operator and the rebalancer that moves slots."""
