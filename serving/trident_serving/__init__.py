"""Server-side helpers for the Trident model repository.

Everything here is plain Python (numpy / torch / the reference libraries) and runs without Triton;
the `model.py` files under `model_repository/` only adapt Triton requests to these functions.
"""
