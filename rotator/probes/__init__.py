"""Probes: checks that the application works with the new key before the old one is touched."""
