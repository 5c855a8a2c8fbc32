"""Who may read the weights: the shared arena, leases, and attaching from a worker."""
