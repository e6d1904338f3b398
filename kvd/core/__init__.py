"""kvd.core."""
