"""Runnable examples: one MLP regression per backend (`python -m looproto.examples.numpy_mlp`)."""
