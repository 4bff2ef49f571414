"""Errors raised for bad user input (files, bands, columns, ids)."""


class PopcornInputError(ValueError):
    """Bad input data: the message names the file, band, column or id and says what to do."""
