"""shardq_gateway: the stateless router in front of the nodes."""
