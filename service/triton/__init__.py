"""The Open Inference Protocol (KServe v2) with Triton's extensions: core.py (neutral), fronts."""
