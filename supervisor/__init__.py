"""contimg-supervisor: the supervisory daemon of the DSA-110 continuum imaging pipeline."""

__version__ = "0.1.0"
