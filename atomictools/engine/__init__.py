"""The engine: atomic, cancellation-safe changes to files and SQLite databases.

It knows nothing about MCP, the command line or any wire format. Layers above it (``server``,
``cli``) import only what this package exports; the folders below are its own parts.
"""
