"""nemo_lite: a small, fast transformer training framework."""

__version__ = "0.1.0"
