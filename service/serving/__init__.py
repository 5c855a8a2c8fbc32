"""The serving process: HTTP (api/), the registry and its state, memory admission and
reports, the loader backend (loaders/), leases and the worker socket. It imports no torch."""
