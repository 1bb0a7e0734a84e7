"""kandinsky_model: filled in by its own issue."""
