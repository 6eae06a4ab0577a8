"""The limiters the shared key's queue is measured against (bench only)."""
