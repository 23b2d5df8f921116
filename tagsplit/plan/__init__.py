"""Stage 3 of the pipeline: a new tag per site and the bytes that give it (see `make` and `model`).

Importing this package loads nothing heavy: `model` is standard-library only, for the debugger side.
"""
