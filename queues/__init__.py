"""Identities: queue naming, task envelopes, and the supervisor of per-identity workers.

Standard library (plus itsdangerous) only: the bridge imports this package.
"""
