"""Bring-your-own models: a Triton config.pbtxt read, its tensors bound to the engine's
contract, the generic runtime."""
