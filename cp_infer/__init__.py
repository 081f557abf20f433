"""cp_infer: exact context-parallel (ring attention) inference for very long contexts."""

__version__ = "0.1.0"
