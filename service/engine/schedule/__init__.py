"""Scheduling: the cross-session batcher, its pending chunks, the Classify lane."""
