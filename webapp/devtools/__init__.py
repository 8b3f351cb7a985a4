"""Tools for the demo and the tests only (never used by a production process)."""
