"""shardq.gateway: the stateless router in front of the nodes."""
