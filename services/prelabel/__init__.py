"""Prelabel: model-assisted data annotation on NVIDIA Triton."""

__version__ = "0.1.0"
