"""Cost and quality metrics."""
