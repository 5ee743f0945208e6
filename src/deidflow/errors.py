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

# Exit statuses of the ``deidflow`` command (documented in the README's Troubleshooting section).
EXIT_OK = 0  # the release is complete: every input file published or deliberately withheld by policy
EXIT_BUG = 1  # an internal error (a bug): the traceback is in the restricted log
EXIT_USAGE = 2  # a user mistake: arguments, configuration, paths, key
EXIT_INCOMPLETE = 3  # the run finished but the release is incomplete (files or subjects withheld)
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C, SIGTERM): run the same command again to resume


class UsageError(PublicError):
    """A user mistake, reported as one line ``deidflow: error: …`` with exit status EXIT_USAGE."""
