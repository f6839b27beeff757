"""MedGPT stages."""
