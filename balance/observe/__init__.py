"""Observability: access logs (metrics and tracing come later)."""
