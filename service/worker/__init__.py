"""What training code imports: `Client`, attaching a handle, lease renewal and callbacks,
the worker socket's client side, the files cache."""
