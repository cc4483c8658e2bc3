"""Offline data loaders of the experiments: Fashion-MNIST (IDX files), Shakespeare texts, MiniLM files."""
