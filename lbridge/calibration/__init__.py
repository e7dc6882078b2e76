"""Offline calibration: trajectory storage and (in later issues) the fitting of learned methods."""
