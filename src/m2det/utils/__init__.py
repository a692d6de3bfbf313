"""Helpers that are no part of detection: timing and memory measurement."""
