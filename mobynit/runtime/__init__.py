"""The OCI runtime for extension containers, and their manager."""
