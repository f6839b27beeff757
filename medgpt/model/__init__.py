"""Model loading, adapter merging and vocabulary changes."""
