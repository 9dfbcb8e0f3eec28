"""Reading files and listing directories inside the roots (never changes anything)."""
