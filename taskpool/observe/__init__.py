"""Observability: the event vocabulary, the log, the live view, the report."""
