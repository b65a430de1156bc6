"""Tests of the retrofit experiment (collected with tests/; set-up in the root conftest.py)."""
