"""Sinks: the places a rotated key is written to. See ``base.Sink`` for the contract."""
