"""Placeholder: filled in by the methods work."""
