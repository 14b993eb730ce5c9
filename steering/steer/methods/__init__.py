"""The method registry (filled in next)."""
