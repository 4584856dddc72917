"""Diagnostics and evaluation: per-timestep loss and bias, sampling drift, guidance, schedules."""
