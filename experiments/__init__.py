"""Research experiments built on famjax (not part of the library); run from the repository root with `python -m`."""
