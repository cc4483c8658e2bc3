"""Experiments and commands: each writes JSON/PNG/Markdown under ``results/<name>/``."""
