"""Continuity: signed snapshots, the shared session store (Redis) and its URLs."""
