"""Process-level helpers shared by the pipelines and benches (memory figures, forked worker pools)."""
