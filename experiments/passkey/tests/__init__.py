"""Tests of the PassKey experiment (collected by `make test` with tests/; set-up in the root conftest.py)."""
