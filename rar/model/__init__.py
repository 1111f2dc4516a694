"""The generator: configuration and presets, the transformer, factorization orders, weight files."""
