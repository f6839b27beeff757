"""MedGPT eval."""
