"""The worker socket: lease id + secret in, the model's file descriptors out."""
