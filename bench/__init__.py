"""Benchmarks of lstm-serve: batched streaming vs naive, transport and compute ceilings, memory."""
