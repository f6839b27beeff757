"""Training recipes, one module per command (layer: stages; imports train, data, model and lower)."""
