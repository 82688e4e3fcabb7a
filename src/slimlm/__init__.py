"""slimlm: make LLMs small enough for the hardware people have, and measure what it costs."""

__version__ = "0.1.0"
