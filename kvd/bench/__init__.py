"""kvd.bench."""
