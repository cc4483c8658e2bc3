"""Offline data loaders for experiments (nothing is downloaded at run time)."""
