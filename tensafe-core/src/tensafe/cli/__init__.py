"""The ``tensafe`` command line."""
