"""A fork server for local job processes: jobs start with the libraries already imported.

Every job of a local run is a new ``python -m deidflow.jobs`` process, and importing pydicom and
numpy costs it about 0.3 s before any work; a run of a few thousand files starts a few dozen jobs,
so that was a tenth of the wall time.  ``deidflow run`` (local execution only) therefore forks this
server before starting Snakemake; the server imports the libraries once and listens on a Unix
socket in a private (0700) temporary folder named by ``$DEIDFLOW_ZYGOTE``.  A job process finding
that variable sends its arguments, working folder, environment and standard streams (as file
descriptors) to the server and waits; the server forks a child that becomes the job: same
streams, same folder, same environment, same code path (:func:`deidflow.jobs.main`), and reports
the exit status back.  Snakemake still sees an ordinary process per job.

Safety: the child exits at once when its job process goes away (Snakemake killed it), signals the
job process receives are forwarded to the child, the server dies with ``deidflow run``
(``PR_SET_PDEATHSIG``), and any failure to reach the server makes the job run in its own process
as before.  Cluster runs never use it (jobs must run inside their allocation).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path

ENV = "DEIDFLOW_ZYGOTE"
# What the server imports before forking: the libraries of every stage that runs in it.
PRELOAD = ("deidflow.release", "deidflow.qc.leakscan", "deidflow.qc.report", "deidflow.qc.audit",
           "deidflow.mapping", "deidflow.formats.stage")
_INT = struct.Struct("<i")


def start() -> tuple[int, str]:
    """Fork the server; returns its pid and the socket path (for ``$DEIDFLOW_ZYGOTE``)."""
    folder = tempfile.mkdtemp(prefix="deidflow-z")  # 0700, short path (Unix sockets allow ~100 bytes)
    path = os.path.join(folder, "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    pid = os.fork()
    if pid:
        listener.close()
        return pid, path
    try:
        _serve(listener)
    finally:
        os._exit(0)


def stop(pid: int, path: str) -> None:
    """End the server and remove its socket folder."""
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    for p in (path, os.path.dirname(path)):
        try:
            os.unlink(p) if p == path else os.rmdir(p)
        except OSError:
            pass


def _serve(listener: socket.socket) -> None:
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children report their status themselves
    sys.modules.setdefault("requests", None)  # see deidflow.jobs.main
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # a stage that cannot import fails in its own job, with its own message
            pass
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os._exit(_become_job(conn))
        conn.close()


def die_with_parent() -> None:
    """Have the kernel kill this (forked) process when its parent exits (Linux; else a no-op)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _become_job(conn: socket.socket) -> int:
    """In a fresh child of the server: take over the job process's streams, folder and
    environment, run the job, send the exit status."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
    if len(fds) != 3:
        return 1
    request = json.loads(data.decode())
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    conn.sendall(_INT.pack(os.getpid()))
    threading.Thread(target=_exit_when_gone, args=(conn,), daemon=True).start()
    from . import jobs
    try:
        rc = jobs.run(request["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the job's own process would print it too
        import traceback
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        conn.sendall(_INT.pack(rc))
    except OSError:
        pass
    return rc


def _exit_when_gone(conn: socket.socket) -> None:
    """The job process sends nothing more; end of stream means it was killed."""
    try:
        conn.recv(1)
    except OSError:
        pass
    os._exit(1)


def run_remote(argv: list[str]) -> int | None:
    """Run the job ``argv`` in a child of the server named by ``$DEIDFLOW_ZYGOTE``; ``None`` when
    the server cannot be reached (the caller then runs the job itself)."""
    path = os.environ.get(ENV)
    if not path or not Path(path).exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [request], [0, 1, 2])
        child = _read_int(conn)
    except OSError:
        conn.close()
        return None
    if child is None:
        return None
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: _forward(child, s))
    rc = _read_int(conn)
    return 1 if rc is None else rc


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _read_int(conn: socket.socket) -> int | None:
    buf = b""
    while len(buf) < _INT.size:
        try:
            chunk = conn.recv(_INT.size - len(buf))
        except InterruptedError:
            continue
        if not chunk:
            return None
        buf += chunk
    return _INT.unpack(buf)[0]
