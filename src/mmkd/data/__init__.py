"""Data: sources that read real files, the built-in world, transforms and batching."""
