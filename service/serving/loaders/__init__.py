"""The serving side of loader processes: each load runs in a child process forked from a
pre-imported template (started and restarted by `keeper`, or a checked shared one); it
hands the service the model's file descriptors and a manifest in the typed, versioned
messages of `service.common.protocol`, then exits (or stays as the runner of a model that
cannot be shared)."""
