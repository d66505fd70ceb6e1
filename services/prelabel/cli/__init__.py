"""The ``prelabel`` command line."""
