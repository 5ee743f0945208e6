"""File-system helpers: atomic writes, restricted folders, read-only input handling."""
from __future__ import annotations

import csv
import errno
import gzip
import io
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

RESTRICTED_DIR_MODE = 0o700
RESTRICTED_FILE_MODE = 0o600
RELEASE_FILE_MODE = 0o644
RELEASE_DIR_MODE = 0o755
RESTRICTED_UMASK = 0o077
JOB_TMP = "tmp/jobs"  # restricted: the temporary files of a run's jobs (emptied by the next run)


def restricted_umask() -> None:
    """Make what this process creates 0600 files and 0700 folders whatever the user's umask (000,
    or 002/022 on a group-shared machine): every file a run writes outside the release gate is
    restricted — ``.snakemake/``, logs, staging trees before their leak scan, working copies,
    pictures of faces before defacing, temporary files.  The gate gives what it publishes the
    release's 0644/0755 (:func:`release_modes`, :func:`make_release_dir`)."""
    os.umask(RESTRICTED_UMASK)


def make_restricted_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and force mode 0700 on it, unless it is a shared sticky
    folder such as ``/tmp`` (a job run by hand with ``--log /tmp/x.log`` must not lock it)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not os.stat(path).st_mode & stat.S_ISVTX:
        os.chmod(path, RESTRICTED_DIR_MODE)
    return path


def make_release_dir(root: Path, rel: str | os.PathLike = "") -> Path:
    """Create the folder ``root/rel`` (and missing parents) with mode 0755 whatever the umask, and
    give every folder from ``root`` down to it that mode too (Snakemake creates a job's output
    folders with the run's umask, 0077)."""
    root = Path(root)
    target = root / rel
    missing, p = [], target
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
    parts = Path(rel).parts
    chain = {root, *(root.joinpath(*parts[:k]) for k in range(1, len(parts) + 1))}
    for p in chain | set(missing):  # new folders above ``root`` too
        if stat.S_IMODE(os.stat(p).st_mode) != RELEASE_DIR_MODE:
            os.chmod(p, RELEASE_DIR_MODE)
    return target


def _set_modes(folder: Path, dir_mode: int, file_mode: int) -> None:
    """Give ``folder`` and every folder and file under it these modes (links are left alone)."""
    os.chmod(folder, dir_mode)
    todo = [os.fspath(folder)]
    while todo:
        with os.scandir(todo.pop()) as it:
            for e in it:
                if e.is_symlink():
                    continue
                if e.is_dir(follow_symlinks=False):
                    os.chmod(e.path, dir_mode)
                    todo.append(e.path)
                else:
                    os.chmod(e.path, file_mode)


def release_modes(folder: Path) -> None:
    """The release gate's modes for a staged folder about to be published (0755 folders, 0644
    files): staged files are restricted until their leak scan passed and the gate moves them."""
    _set_modes(Path(folder), RELEASE_DIR_MODE, RELEASE_FILE_MODE)


def restricted_modes(path: Path) -> None:
    """Restricted modes (0700/0600) for a file or folder moved into the restricted folder."""
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_dir():
        _set_modes(path, RESTRICTED_DIR_MODE, RESTRICTED_FILE_MODE)
    else:
        os.chmod(path, RESTRICTED_FILE_MODE)


def job_tmp(restricted: Path) -> Path:
    """The folder for a run's temporary files inside the restricted folder (0700)."""
    return make_restricted_dir(Path(restricted) / JOB_TMP)


def use_job_tmp(restricted: Path) -> Path:
    """Make :func:`job_tmp` this process's temporary folder and its children's (``TMPDIR``): a
    registration's files, an external program's copy of a head with its face, a decompressed
    original never land in the system's ``/tmp``, where a killed job leaves them."""
    folder = job_tmp(restricted)
    tempfile.tempdir = os.environ["TMPDIR"] = str(folder)
    return folder


def clear_job_tmp(restricted: Path) -> None:
    """Delete what killed jobs of earlier runs left in :func:`job_tmp` (at the start of a run,
    before any job of it starts)."""
    shutil.rmtree(Path(restricted) / JOB_TMP, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename; the file gets ``mode``, by
    default :data:`RESTRICTED_FILE_MODE` (writes into the release name theirs).  The temporary file lies in
    ``tmp_dir`` (a folder on the same file system) or else next to ``path``: a write into the
    release names one outside it, so no half-written ``.part`` file is ever seen there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    where = path.parent if tmp_dir is None else make_restricted_dir(tmp_dir)
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, RESTRICTED_FILE_MODE if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_text(path: Path, text: str, mode: int | None = None, tmp_dir: Path | None = None) -> None:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode, tmp_dir)


def append_line(path: Path, line: str, mode: int = RESTRICTED_FILE_MODE) -> None:
    """Append ``line`` (a newline added) to an append-only record in one ``write``, the file made
    with ``mode``.  A line cut short by an earlier crash (a full disk) is ended first, so the new
    line never runs on from it."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, mode)
    try:
        size = os.fstat(fd).st_size
        cut = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if cut else "") + line.rstrip("\n") + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def write_if_changed(path: Path, data: bytes, mode: int | None = None) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly it (keeps mtimes stable).

    Returns True when the file was (re)written.
    """
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write_bytes(path, data, mode)
    return True


def publish_dir(staging: Path, final: Path) -> None:
    """Move a completely written staging folder into place.  A previous version of ``final`` is
    swapped out in one atomic exchange (Linux ``renameat2``) and then deleted from where the
    staging folder was; where the exchange is not available it is first renamed next to the
    staging folder (never left in the release), then deleted."""
    staging, final = Path(staging), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.replace(staging, final)
    elif exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # the previous version
    else:
        trash = staging.with_name(f".trash-{final.name}")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths on one file system (``renameat2(RENAME_EXCHANGE)``); False when
    the system cannot (other kernel or C library, or a file system without it)."""
    global _renameat2
    if _renameat2 is None:
        import ctypes
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if not _renameat2:
        return False
    import ctypes
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_tree(path: Path, trash_dir: Path) -> None:
    """Take a folder out in one rename (into ``trash_dir``, on the same file system), then delete it."""
    path = Path(path)
    if not path.exists():
        return
    trash_dir = make_restricted_dir(trash_dir)
    trash = Path(tempfile.mkdtemp(dir=trash_dir, prefix=".trash-"))
    os.replace(path, trash / "x")
    shutil.rmtree(trash, ignore_errors=True)


def staging_dir_for(final: Path, restricted: Path) -> Path:
    """A fresh staging folder for ``final``: inside ``restricted`` when on the same file system
    (so nothing partial is ever visible in the release), else a hidden sibling of ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = make_restricted_dir(Path(restricted) / "tmp")
    if os.stat(tmp_root).st_dev == os.stat(final.parent).st_dev:
        base = tmp_root
    else:
        base = final.parent
    stage = base / f".staging-{final.name}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def csv_text(rows) -> str:
    """Rows as CSV text with \\n line ends (deterministic bytes for the mapping files)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def display_path(rel: str) -> str:
    """A file name as text: undecodable bytes become ``\\xNN`` escapes (names are bytes on POSIX)."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def changed_input(input_dir: Path, entry: Mapping[str, Any]) -> str:
    """Why the input file of a manifest ``entry`` is not the file the inventory examined, or "".

    The inventory walks without following links and records each file's size, modification and
    status-change times (a file copied over another with its times kept, ``cp -p``, has a new ctime);
    a job opens the path later. A file rewritten since, replaced by a symbolic link (to another
    patient's file, to /etc/passwd) or reached through a folder replaced by one must not be read
    under the identity the inventory gave it: the job quarantines it with this reason, and the next
    run takes a new inventory."""
    path = os.path.join(input_dir, os.fsdecode(entry["relpath"]))
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"file not readable: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "changed since the inventory (no longer a regular file); run again"
    if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (entry.get("size"), entry.get("mtime_ns"), entry.get("ctime_ns")):
        return "changed since the inventory (size, modification or status-change time); run again"
    root = _real_root(os.fspath(input_dir))
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        return "changed since the inventory (a folder of its path is now a symbolic link); run again"
    return ""


@lru_cache(maxsize=8)
def _real_root(input_dir: str) -> str:
    """The input folder's real path, resolved once per process (a job checks every file of its
    unit against it; a root swapped for a link later leaves the files outside it)."""
    return os.path.realpath(input_dir)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# zlib level of every gzip file deidflow writes (NIfTI from conversion, defaced NIfTI, masks):
# level 1 compresses a 4.5 MB T1 stack 5x faster than level 6 (0.06 s vs 0.28 s) into a file 8 %
# larger (2.16 vs 2.01 MB); a default run compresses each converted head twice (convert, face).
GZIP_LEVEL = 1


def gzip_bytes(data: bytes) -> bytes:
    """``data`` gzip-compressed at :data:`GZIP_LEVEL` with mtime 0 and no file name in the header
    (equal content gives equal bytes; a killed run resumes to the same release)."""
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


@contextmanager
def output_stream(path: Path, gz: bool):
    """A binary writer for ``path``, gzip-compressed when ``gz`` (mtime 0 and no file name in the
    gzip header, so equal content gives equal bytes)."""
    with open(path, "wb") as raw:
        if gz:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) as sink:
                yield sink
        else:
            yield raw


QC_SUBDIR = "derivatives/deidflow/qc"  # the QC folder of a release (and of a staged subject's tree)


def layout_parents(root: Path) -> list[Path]:
    """The folders of the release layout that hold subject folders, sorted: ``root``,
    ``sourcedata/<fmt>``, ``derivatives/<name>`` and ``derivatives/<name>/<sub>`` (a subject's own
    folder is none of them, so a lookup per subject costs the same at any dataset size)."""
    root = Path(root)

    def dirs(p: Path) -> list[Path]:
        try:
            return sorted(Path(e.path) for e in os.scandir(p) if e.is_dir() and not e.name.startswith("sub-"))
        except (FileNotFoundError, NotADirectoryError):
            return []
    derivatives = dirs(root / "derivatives")
    return [root, *dirs(root / "sourcedata"), *derivatives, *(q for d in derivatives for q in dirs(d))]
