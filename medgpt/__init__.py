"""MedGPT: turn a base language model into a medical assistant, end to end.

Run `medgpt --help` for the command list.
"""

__version__ = "0.1.0"
