"""Stand-ins for packages Orbit's tests import, put on `sys.path` only where they run."""
