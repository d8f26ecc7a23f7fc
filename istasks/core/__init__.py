"""The pure image core: read a frame, reduce it, compute statistics, map to 8 bits, encode.

Nothing in this package imports Celery, ZeroMQ or Redis. Submodules are imported
explicitly (this file imports nothing) so light callers pay only for what they use.
"""
