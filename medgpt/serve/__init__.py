"""MedGPT serve."""
