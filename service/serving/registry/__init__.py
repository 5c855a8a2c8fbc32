"""Held models: records and the table of allowed state transitions."""
