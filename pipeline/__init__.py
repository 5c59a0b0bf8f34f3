"""Kafka I/O, decoding, windowing, recordings, simulator and CLI."""
