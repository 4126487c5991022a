"""Command-line entry points (installed as erw-* scripts)."""
