"""Red-team round 7: operations and data handling earlier rounds left open (file modes under any
umask, temporary files outside the restricted folder, copied releases, few-tile slides under every
pixel mode, key files, full disks). Each fix has a test here that failed on the code before it
(docs/design-notes.md, "Red-team round 7: operations left open")."""
from __future__ import annotations

import gzip
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_redteam5_ops import KEY, _dicom_patient, _env, cli, start_paused  # start_paused runs with KEY
NAME, PID, BIRTH = "QUIMBY^OTTILIE", "MRN5513092", "19580311"


def _run(inp: Path, out: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    env = _env(DEIDFLOW_KEY=KEY, **kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2",
                           "--set", "face.method=none", "--set", "jobs.min_batches=1", *extra],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def _input(root: Path, gz: bool = True) -> Path:
    """Two patients; the second one's file gzip-compressed (.dcm.gz: read through a decompressed copy)."""
    _dicom_patient(root, "p1", NAME, PID, BIRTH, files=2)
    (second,) = _dicom_patient(root, "p2", "VANTERPOOL^IDA", "MRN7730021", "19700102")
    if gz:
        Path(f"{second}.gz").write_bytes(gzip.compress(second.read_bytes()))
        second.unlink()
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# 1. Restricted data 0700/0600 whatever the umask
# ------------------------------------------------------------------------------------------------
def _loose(root: Path) -> list[str]:
    """Entries under ``root`` (itself included) that its group or other users may read, write or enter."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                out.append(f"{os.path.relpath(p, root)} {oct(st.st_mode & 0o777)}")
    return out


@pytest.mark.slow
@pytest.mark.workflow
def test_everything_in_the_restricted_folder_is_private_whatever_the_umask(tmp_path):
    """Under umask 000, `.snakemake/` (metadata, Snakemake's log), the staging trees before their
    leak scan, `work/bids-dicom/` and the other working files in the restricted folder were
    0666/0777 (under 022, 0644/0755): the folder itself is 0700, but a copy (`cp -a`, `rsync -a`,
    a backup) keeps the modes. Every job and the main process now make 0600/0700; the release
    gate gives what it publishes 0644/0755."""
    inp, out, flags = _input(tmp_path / "input"), tmp_path / "release", tmp_path / "flags"
    restricted = tmp_path / "release_restricted"
    flags.mkdir()
    p = start_paused(inp, out, "verify", flags, "--set", "jobs.min_batches=1", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.umask(0))
    try:
        staged = [q for q in (restricted / "staging").rglob("*") if q.is_file()]
        assert staged, "nothing staged at the verify job"
        during = _loose(restricted)
        (flags / "verify").unlink()
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, (stdout[-1500:], stderr[-1500:])
    assert during == [], during[:10]
    assert _loose(restricted) == [], _loose(restricted)[:10]
    assert (restricted / ".snakemake").is_dir() and (restricted / "work" / "bids-dicom").is_dir()
    files = [q for q in out.rglob("*") if q.is_file()]
    assert len(files) > 5
    assert {stat.S_IMODE(q.stat().st_mode) for q in files} == {0o644}
    assert {stat.S_IMODE(q.stat().st_mode) for q in [out, *(q for q in out.rglob("*") if q.is_dir())]} == {0o755}


def test_release_gate_modes_and_folders(tmp_path):
    """The gate's helpers: a staged folder gets 0755/0644 as it is published, folders made in the
    release (or by Snakemake with the run's umask) get 0755, and what is set aside from the
    release into the restricted folder gets 0700/0600."""
    from deidflow.fsutil import make_release_dir, release_modes, restricted_modes
    old = os.umask(0o077)
    try:
        staged = tmp_path / "staged" / "sub-x"
        (staged / "anat").mkdir(parents=True)
        (staged / "anat" / "a.nii.gz").write_bytes(b"x")
        release_modes(staged)
        assert stat.S_IMODE((staged / "anat").stat().st_mode) == 0o755
        assert stat.S_IMODE((staged / "anat" / "a.nii.gz").stat().st_mode) == 0o644
        rel = tmp_path / "new" / "release"
        make_release_dir(rel)                          # and its missing parent
        (rel / "derivatives").mkdir(mode=0o700)        # as Snakemake makes an output folder
        make_release_dir(rel, "derivatives/deidflow/qc")
        for q in (tmp_path / "new", rel, rel / "derivatives", rel / "derivatives/deidflow", rel / "derivatives/deidflow/qc"):
            assert stat.S_IMODE(q.stat().st_mode) == 0o755, q
        restricted_modes(staged)
        assert _loose(staged) == []
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------
# 2. Temporary files outside the restricted folder
# ------------------------------------------------------------------------------------------------
def _files_in(folder: Path) -> list[str]:
    """Everything under ``folder`` that is not a folder or a socket."""
    return [str(q) for q in folder.rglob("*") if not (q.is_dir() or stat.S_ISSOCK(q.lstat().st_mode))]


def _fake_dciodvfy(bin_dir: Path, record: Path, wait: bool) -> None:
    """A dciodvfy that records the files it is given (the report runs it on an original and on its
    release copy; a .dcm.gz original through a decompressed copy) and, with ``wait``, hangs."""
    bin_dir.mkdir()
    exe = bin_dir / "dciodvfy"
    exe.write_text(f"#!/bin/sh\necho \"$1\" >> {record}\n" + ("sleep 120\n" if wait else "") + "exit 0\n")
    exe.chmod(0o755)


@pytest.mark.slow
@pytest.mark.workflow
def test_decompressed_original_never_lands_in_the_system_temp_folder(tmp_path):
    """The report's dciodvfy check decompressed a `.dcm.gz` original (name, MRN, birth date) into
    `tempfile.TemporaryDirectory()` — the system's /tmp — and a run killed meanwhile left it there
    for good (as killed face jobs leave `deidflow-reg-*`, and the external backends would leave a
    head with its face). Every job now keeps its temporary files in `<restricted>/tmp/jobs`,
    which the next run empties: after a SIGKILL nothing of the input lies outside the restricted
    folder, and the rerun leaves nothing behind."""
    inp, out = _input(tmp_path / "input"), tmp_path / "release"
    for f in inp.rglob("*.dcm"):  # every original compressed (dciodvfy checks one file per kind of object)
        Path(f"{f}.gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    restricted = tmp_path / "release_restricted"
    tmp, record = tmp_path / "systmp", tmp_path / "dciodvfy.txt"
    tmp.mkdir()
    _fake_dciodvfy(tmp_path / "bin", record, wait=True)
    env = _env(DEIDFLOW_KEY=KEY, TMPDIR=str(tmp), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    args = [sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2",
            "--set", "face.method=none", "--set", "jobs.min_batches=1"]
    p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (record.exists() and record.read_text().strip()) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert record.exists(), "dciodvfy never ran"
        os.killpg(p.pid, signal.SIGKILL)   # the run and every job, as the OOM killer or a power cut would
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    given = [Path(line) for line in record.read_text().split()]
    originals = [g for g in given if "input" not in g.parts and g.name.startswith(".gunzip-")]
    assert originals, given
    for g in originals:
        assert restricted in g.parents, g
    # no file is left in the system's temporary folder: the job server's socket folder and
    # Snakemake's own (its source cache) may stay, empty of anything but a socket
    assert _files_in(tmp) == [], _files_in(tmp)
    assert any((restricted / "tmp" / "jobs").rglob(".gunzip-*"))
    _fake_dciodvfy(tmp_path / "bin2", tmp_path / "again.txt", wait=False)
    r = _run(inp, out, env={"TMPDIR": str(tmp), "PATH": f"{tmp_path / 'bin2'}:{os.environ['PATH']}"})
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-1500:])
    assert not any((restricted / "tmp" / "jobs").rglob(".gunzip-*"))
    assert _files_in(tmp) == []


# ------------------------------------------------------------------------------------------------
# 3. A release copied together with its restricted folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.parametrize("how", ["cp", "copytree"])
def test_release_copied_with_its_restricted_folder_is_not_published_again(tmp_path, how):
    """A release and its restricted folder copied with `cp -a` or `rsync -a` (here: Python's
    copytree, which keeps the same; rsync is not installed on the test machine) (a move to new
    storage, a restore from backup) had every unit published again on the next run: the publish
    record compared status-change times, which no copy keeps, so every unit's chain ran again
    from its first stage. The record now holds each file's SHA-256 too; a file whose ctime alone
    differs is compared by it (once: the new time is recorded). An edit that keeps size and
    mtime (`touch -r`) is still published again."""
    inp, a = _input(tmp_path / "input", gz=False), tmp_path / "a" / "release"
    r = _run(inp, a)
    assert r.returncode == 0, r.stderr[-1500:]
    b = tmp_path / "b" / "release"
    b.parent.mkdir()
    for folder in ("release", "release_restricted"):
        if how == "cp":
            subprocess.run(["cp", "-a", str(a.parent / folder), str(b.parent / folder)], check=True)
        else:   # as rsync -a or a backup restore: contents, modes and times, new inodes and ctimes
            shutil.copytree(a.parent / folder, b.parent / folder, symlinks=True)
    shutil.rmtree(a.parent)  # moved: the run record's release is gone
    before = _files(b)
    r = _run(inp, b)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "Nothing to be done" in r.stdout, (r.stdout[-800:], r.stderr[-800:])
    assert _files(b) == before
    r = _run(inp, b)   # the new ctimes were recorded
    assert "Nothing to be done" in r.stdout
    # an edit with size and time kept is still caught
    target = next(q for q in b.rglob("*.dcm"))
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = _run(inp, b)
    assert r.returncode == 0 and "Nothing to be done" not in r.stdout, r.stdout[-1500:]
    assert _files(b) == before


# ------------------------------------------------------------------------------------------------
# 4. Few-tile slide images under every pixel mode; tiled TIFF
# ------------------------------------------------------------------------------------------------
def _label_images(tmp_path: Path):
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=30)
    label = Image.new("RGB", (480, 200), "white")
    d = ImageDraw.Draw(label)
    d.text((20, 30), "S19-4711 A1", fill="black", font=font)
    d.text((20, 110), "DOE, JANE", fill="black", font=font)
    return label


@pytest.mark.parametrize("case", ["always", "auto with a selected label"])
def test_slide_label_of_a_few_tiles_is_screened_in_every_mode(tmp_path, case):
    """Round 6 screened whole-slide images of at most 8 tiles under `pixels.clean: auto`, but only
    in a series where nothing else was selected: under `always` (tiles are not cleaned) and in a
    series where a LABEL or another image was selected for cleaning (the usual WSI layout: label,
    overview and levels share one series), a label stored as 2 x 2 VOLUME tiles was neither
    screened nor cleaned and released with "DOE, JANE". Such tiles are now screened in every mode
    but `off`, and withheld on text."""
    from .conftest import require_shared
    from .test_pixels_realdata import WSI, pixel_hash, run_subject
    from .test_redteam6_lead import _tiled
    from PIL import Image
    src = require_shared(*WSI.parts) / "sm_image.dcm"
    made = tmp_path / "made"
    made.mkdir()
    files = {"label.dcm": _tiled(src, _label_images(tmp_path), (2, 2), made / "label.dcm"), "level.dcm": src}
    mode = "always"
    if case != "always":
        mode = "auto"
        files["thumb.dcm"] = _tiled(src, Image.new("RGB", (240, 100), "white"), (1, 1), made / "thumb.dcm",
                                    image_type="LABEL")
    out_dir, _, bad, audit = run_subject(files, tmp_path / "run", {"clean": mode})
    assert not (out_dir / "label.dcm").exists(), bad
    assert any("stored as tiles shows text" in reason for _, reason in bad), bad
    assert pixel_hash(out_dir / "level.dcm") == pixel_hash(src)


def test_tiled_tiff_of_a_few_tiles_is_screened(tmp_path):
    """A scanned form or label saved as a tiled TIFF (2 x 2 tiles of 256) counted as a slide pyramid,
    whose pages are never screened: "DOE JANE MRN 5566778" was released in its pixels. A tiled
    TIFF whose first page has at most 8 tiles is screened like a plain one."""
    import numpy as np
    import tifffile
    from PIL import Image, ImageDraw, ImageFont
    from deidflow.formats import FormatError, tiff
    from .test_formats_tiff import ctx
    img = Image.new("L", (512, 512), 20)
    ImageDraw.Draw(img).text((10, 200), "DOE JANE MRN 5566778 01/02/1960", fill=255,
                             font=ImageFont.load_default(size=22))
    src = tmp_path / "form.tif"
    tifffile.imwrite(src, np.asarray(img), photometric="minisblack", tile=(256, 256))
    with pytest.raises(FormatError, match="shows text"):
        tiff.scrub(src, tmp_path / "out.tif", ctx())
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((512, 512), 20, np.uint8), photometric="minisblack", tile=(256, 256))
    tiff.scrub(blank, tmp_path / "blank-out.tif", ctx())   # released


# ------------------------------------------------------------------------------------------------
# 5. Key files
# ------------------------------------------------------------------------------------------------
def test_key_file_from_process_substitution_is_a_clear_usage_error(tmp_path):
    """`--key-file <(cat key)` (a /dev/fd path to a pipe) said "key file /proc/…/fd/pipe:[…]: no such
    file": the path was resolved to the pipe's name before it was read. It is now read as given and
    refused as a pipe (every job reads the key file again), exit 2, one line."""
    inp = tmp_path / "input"
    _dicom_patient(inp, "p1", NAME, PID, BIRTH)
    r_fd, w_fd = os.pipe()
    os.write(w_fd, (KEY + "\n").encode())
    os.close(w_fd)
    try:
        r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(tmp_path / "out"),
                            "--key-file", f"/dev/fd/{r_fd}", "--dry-run"], env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=120, pass_fds=(r_fd,))
    finally:
        os.close(r_fd)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deidflow: error: "), r.stderr
    assert "not a regular file" in lines[0] and "pipe" in lines[0] and "no such file" not in lines[0], lines


def test_same_key_text_gives_the_same_key_from_a_file_or_the_environment(tmp_path):
    """Key text with or without its newline, with CRLF, in a file or in $DEIDFLOW_KEY: one key
    (held). A key whose text ends in a non-ASCII space (copied from a web page or a PDF) was one key
    from a file (bytes stripped of ASCII whitespace) and another from the environment (text
    stripped of every Unicode space): the same release got other pseudonyms depending on how the
    key was passed. And a key in the environment that is not UTF-8 was an internal error (exit 1)."""
    from deidflow.pseudonym import fingerprint, load_key
    base = "rt7-key-0123456789abcdef"
    prints = set()
    for i, text in enumerate([base, base + "\n", base + "\r\n", "  " + base + "\n\n"]):
        f = tmp_path / f"k{i}"
        f.write_bytes(text.encode())
        prints.add(fingerprint(load_key(f)))
        prints.add(fingerprint(load_key(None, env={"DEIDFLOW_KEY": text})))
    assert len(prints) == 1
    nbsp = base + "\u00a0"
    f = tmp_path / "nbsp"
    f.write_bytes(nbsp.encode())
    assert load_key(f) == load_key(None, env={"DEIDFLOW_KEY": nbsp})
    latin1 = os.fsdecode(b"rt7-key-0123456789abcdef\xe9")   # as os.environ holds non-UTF-8 bytes
    assert load_key(None, env={"DEIDFLOW_KEY": latin1}) == b"rt7-key-0123456789abcdef\xe9"


def test_empty_key_file_is_a_usage_error(tmp_path):
    """An empty key file or one holding a newline only: exit 2, one line (held)."""
    inp = tmp_path / "input"
    _dicom_patient(inp, "p1", NAME, PID, BIRTH)
    for content in (b"", b"\n"):
        key = tmp_path / "empty.key"
        key.write_bytes(content)
        key.chmod(0o600)
        r = cli("run", str(inp), str(tmp_path / "out"), "--key-file", str(key), "--dry-run")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "shorter than 16 bytes" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------------
# 7. Mapping labels on case-insensitive file systems
# ------------------------------------------------------------------------------------------------
def test_mapping_labels_that_differ_only_in_case_are_refused(tmp_path):
    """A trust-centre mapping `A -> AB`, `B -> ab` was accepted: on a case-insensitive file system
    (macOS's default, exFAT, SMB shares) sub-AB and sub-ab are one folder, so the second patient's
    publish replaced or merged into the first's. Refused like two equal labels."""
    from deidflow.pseudonym import load_mapping
    m = tmp_path / "map.csv"
    m.write_text("id_old,id_new\nA,AB\nB,ab\n")
    with pytest.raises(ValueError, match="differ only in letter case"):
        load_mapping(m)


# ------------------------------------------------------------------------------------------------
# 6. A full disk at each stage
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 48 MB tmpfs at ``tmp_path/fs`` (root only; skipped where mounting is not allowed)."""
    where = tmp_path / "fs"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; the filler's path."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 512, 1):
            try:
                while os.write(fd, b"\0" * size) == size:
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture(scope="module")
def full_disk_reference(tmp_path_factory):
    """An uninterrupted run's release of the full-disk tests' input (on the ordinary disk)."""
    base = tmp_path_factory.mktemp("rt7-ref")
    inp = _input(base / "input")
    r = _run(inp, base / "release", "--set", "outputs.bids=true")
    assert r.returncode == 0, r.stderr[-2000:]
    return inp, _files(base / "release")


@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.parametrize("point", ["dicom", "convert", "verify", "publish", "publish-mid", "verify_dataset",
                                   "publish_dataset"])
def test_full_disk_at_each_stage_fails_closed_and_resumes_byte_identical(tmp_path, small_fs, full_disk_reference,
                                                                          point):
    """The file system holding the release and its restricted folder fills up while a stage runs:
    the run ends non-zero, the release holds no partial file (each file there is the finished
    run's, byte for byte) and keeps RELEASE_INCOMPLETE; after space is freed the same command
    finishes with the uninterrupted run's release, byte for byte."""
    inp, reference = full_disk_reference
    out, flags = small_fs / "release", tmp_path / "flags"
    flags.mkdir()
    p = start_paused(inp, out, point, flags, "--set", "jobs.min_batches=1", "--set", "outputs.bids=true",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        filler = _fill(small_fs)
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            (flags / point).unlink(missing_ok=True)  # publish-mid pauses after every folder it moves
            time.sleep(0.1)
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode not in (0, 1), (p.returncode, stdout[-1500:], stderr[-2500:])
    assert (out / "RELEASE_INCOMPLETE").exists()
    for rel, data in _files(out).items():
        assert rel == "RELEASE_INCOMPLETE" or reference.get(rel) == data, rel
    filler.unlink()
    r = _run(inp, out, "--set", "outputs.bids=true")
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-2500:])
    assert _files(out) == reference


@pytest.mark.parametrize("table", ["id_old,id_new\nA,AB\nB,ab\n", "id_old,id_new\nA,sub-01\nA,02\n",
                                   "id_old,id_new\nA,01-x\n", "id_new\n01\n"])
def test_bad_mapping_table_is_a_usage_error(tmp_path, table):
    """A trust-centre mapping table the loader refuses (a label used twice, a patient listed twice,
    a label that is not alphanumeric, a missing column) failed while Snakemake parsed the workflow
    (or in the dry run's preview): exit 1, "internal error … this is a bug", or, for labels that
    differ only in case, a run. Now checked with the configuration: exit 2, one line naming the key."""
    inp = tmp_path / "input"
    _dicom_patient(inp, "p1", NAME, PID, BIRTH)
    m = tmp_path / "map.csv"
    m.write_text(table)
    for extra in (["--dry-run"], []):
        r = cli("run", str(inp), str(tmp_path / "out"), "--set", f"pseudonym.mapping_csv={m}", *extra, DEIDFLOW_KEY=KEY)
        assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
        assert r.stderr.startswith("deidflow: error: config key pseudonym.mapping_csv: ") and r.stderr.count("\n") == 1, r.stderr
