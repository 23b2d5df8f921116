"""Stage 6 of the pipeline: attribute outstanding pool and its growth to individual call sites."""
