"""Structural choices tested while tuning the relay; each module's docstring holds the verdict."""
