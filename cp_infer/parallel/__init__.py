"""Parallelization of the plain model: TP layers, PP stages, EP dispatch (CP is in attention)."""

from cp_infer.parallel.parallelize import check_model_fits_layout, parallelize

__all__ = ["check_model_fits_layout", "parallelize"]
