"""Text as agents see it: decoding with encoding, BOM and newline kept; exact-match edits."""
