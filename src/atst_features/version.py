"""The package version (read by the build from here, and written into every model folder's provenance)."""

__version__ = "0.1.0.dev0"
