"""The PassKey extrapolation experiment (issue 6): `python -m experiments.passkey.run --help`."""
