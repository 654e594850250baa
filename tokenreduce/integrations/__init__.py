"""Integrations of tokenreduce's methods into other runtimes (serving engines)."""
