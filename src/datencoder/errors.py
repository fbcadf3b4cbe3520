"""One exception type for every user-facing problem.

The CLI prints ``DatencoderError`` as a single line (``error: ...``) and exits with code 2;
library callers catch it like any other exception. Messages name the problem *and* the fix.
"""

__all__ = ["DatencoderError"]


class DatencoderError(ValueError):
    """A user-facing error: bad input, incompatible artifact, wrong configuration."""
