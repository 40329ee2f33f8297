"""The one exception type the pure cores raise for bad input."""

from __future__ import annotations


class ValidationError(ValueError):
    """Bad input, with the offending field named.

    `str(err)` reads `"<field>: <what is wrong>"`, which the services pass through as the message
    of a 422 (or a rejected execution report) unchanged.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
