"""What every basehold process may import: errors, sizes, the load spec and its
normalization, handle descriptors, the loader protocol's typed messages, private folders.
Nothing here imports the serving, loader or worker side."""
