"""Compute: the one module that calls onnxruntime, and the state rows of a model version."""
