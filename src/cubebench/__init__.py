"""cubebench: reproducible ML benchmarks on Earth System Data Cubes."""

from cubebench.errors import CubebenchError

__all__ = ["CubebenchError", "__version__"]
__version__ = "0.1.0"
