"""Thin click commands run by the MLproject as `python -m entrypoints.<name>`."""
