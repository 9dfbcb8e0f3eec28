"""Durable primitives: the pending file, fsync helpers, temp names, locks, steps, worker hops.

Everything that makes one change atomic and durable on disk, and nothing that knows what a
change set or a tool is.
"""
