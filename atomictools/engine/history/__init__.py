"""History and undo: every change recorded with the content it replaced, and taken back."""
