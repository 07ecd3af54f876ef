"""The control plane: registry and state, planning, shard building and push, routing, failover, CLI."""
