"""Captioned image sources, transforms and caches (imported as ldm.data)."""
