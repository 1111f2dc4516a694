"""Evaluation: sampling into ADM `.npz` files, the TF-faithful Inception, FID / IS / precision /
recall, and the demo's digit evaluation."""
