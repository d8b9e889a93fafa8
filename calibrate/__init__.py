"""Threshold calibration from good samples (run-time path: no torch)."""
