"""Writing result tables: CSV cells that spreadsheets show as text."""

from __future__ import annotations


def csv_safe(value):
    """A CSV cell that spreadsheets show as text: one starting with = + - @ (or a tab / carriage
    return) would otherwise run as a formula, so it gets a leading apostrophe."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
