"""What outlives the process: the state database, the one-instance lock, stale files."""
