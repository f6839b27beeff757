"""MedGPT infer."""
