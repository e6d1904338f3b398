"""kvd.server."""
