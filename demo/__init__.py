"""Demo / data-generation helpers for uwrt (synthetic applicants, training data)."""
