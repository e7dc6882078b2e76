"""Metrics: against the same-seed full-compute reference, and against the prompts."""
