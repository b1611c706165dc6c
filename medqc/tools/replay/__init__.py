"""``medqc replay``."""
