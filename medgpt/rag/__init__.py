"""MedGPT rag."""
