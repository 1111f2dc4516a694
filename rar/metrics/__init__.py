"""Image metrics: FID / sFID / IS / precision / recall of ADM `.npz` files (`fidelity`), the
TF-faithful Inception (`inception`), and the demo's digit classifier metrics (`digits`)."""
from .fidelity import (evaluate_npz, feature_statistics, frechet_distance, inception_score, load_reference,
                       precision_recall, read_npz_images)

__all__ = ["evaluate_npz", "feature_statistics", "frechet_distance", "inception_score", "load_reference",
           "precision_recall", "read_npz_images"]
