"""What memory is free and used, per device and per model, and admission against it."""
