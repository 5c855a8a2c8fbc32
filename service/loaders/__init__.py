"""The serving side of loader processes: each load runs in a child process forked from a
pre-imported template; it hands the service the model's file descriptors and a JSON
manifest, then exits (or stays as the runner of a model that cannot be shared)."""
