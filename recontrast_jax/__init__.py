"""ReContrast and ReConPatch unsupervised anomaly detection in JAX/Flax."""

__version__ = "0.1.0"
