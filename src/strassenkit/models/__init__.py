"""Reference models for experiments (not part of the core library)."""
