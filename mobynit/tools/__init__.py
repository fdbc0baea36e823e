"""The `mobynit` command line."""
