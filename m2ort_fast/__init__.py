"""m2ort-fast: per-spot gene expression from H&E whole-slide images with M2ORT."""

__version__ = "0.1.0"
