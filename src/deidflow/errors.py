"""Exceptions whose messages are safe to show anywhere (they carry no identifying value)."""
import errno

# errno values that mean "the output cannot be written" (never a property of an input file).
OUTPUT_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG))


def output_error_of(exc: BaseException) -> OSError | None:
    """The OSError meaning "the output cannot be written" (OUTPUT_ERRNOS) that ``exc`` is or was
    raised from, if any. pydicom re-raises a write error as a new OSError naming the tag, without
    errno: read as an input problem, a full disk withheld the file for good."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class PublicError(RuntimeError):
    """An error message built only from pseudonyms, counts and system error strings."""


def public_reason(exc: BaseException) -> str | None:
    """The part of ``exc`` that may be shown outside the restricted folder, if any."""
    if isinstance(exc, PublicError):
        return str(exc)
    if (full := output_error_of(exc)) is not None:
        return f"cannot write output: {full.strerror}"
    return None

# Exit statuses of the ``deidflow`` command (documented in the README's Troubleshooting section).
EXIT_OK = 0  # the release is complete: every input file published or deliberately withheld by policy
EXIT_BUG = 1  # an internal error (a bug): the traceback is in the restricted log
EXIT_USAGE = 2  # a user mistake: arguments, configuration, paths, key
EXIT_INCOMPLETE = 3  # the run finished but the release is incomplete (files or subjects withheld)
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C, SIGTERM): run the same command again to resume


class UsageError(PublicError):
    """A user mistake, reported as one line ``deidflow: error: …`` with exit status EXIT_USAGE."""
