"""Exceptions whose messages are safe to show anywhere (they carry no identifying value)."""
import errno

# errno values that mean "the output cannot be written" (never a property of an input file).
OUTPUT_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG))


class PublicError(RuntimeError):
    """An error message built only from pseudonyms, counts and system error strings."""


def public_reason(exc: BaseException) -> str | None:
    """The part of ``exc`` that may be shown outside the restricted folder, if any."""
    if isinstance(exc, PublicError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
        return f"cannot write output: {exc.strerror}"
    return None
