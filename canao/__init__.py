"""canao: compression-compilation co-design for transformers on small CPUs."""

__version__ = "0.1.0"
