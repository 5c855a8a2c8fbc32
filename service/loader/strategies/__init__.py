"""How a model loads: one strategy per file behind `base.Loader`."""
