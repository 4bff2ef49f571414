"""Front ends: thin command-line wrappers over the library (``popcorn <command>``, see :mod:`.main`)."""
