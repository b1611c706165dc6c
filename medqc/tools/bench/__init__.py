"""``medqc bench``."""
