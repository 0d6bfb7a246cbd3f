"""Data: synthetic degradations, the standard all-in-one folder layouts, the built-in demo set and the input pipeline."""
