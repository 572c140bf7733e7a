"""Flax encoders, bottleneck and decoder of ReContrast."""
