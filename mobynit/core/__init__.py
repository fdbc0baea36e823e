"""The boot path: read the stores, decide, plan, mount (standard library only)."""
