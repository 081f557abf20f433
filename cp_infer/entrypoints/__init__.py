"""Front doors over the engine: one module per command (``generate``; later ``serve``, ...)."""
