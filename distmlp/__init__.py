"""distmlp: a data-parallel trainer on Ray for small NumPy MLPs."""

__version__ = "0.1.0"
