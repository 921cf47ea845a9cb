"""PIPS: learn discrete codes of structured data (ARC grids, images, sequences)."""

__version__ = "0.1.0"
