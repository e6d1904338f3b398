"""kvd.cli."""
