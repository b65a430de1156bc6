"""Test set-up of tests/: the 8 fake CPU devices and float32 matmuls are set in the repository's root
conftest.py (before jax is imported), which pytest loads first for tests/ and experiments/ alike."""
