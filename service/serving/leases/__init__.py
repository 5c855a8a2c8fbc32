"""Leases: the table (with the state database) and lending a held model's fds."""
