"""MINC1 (NetCDF-3 classic) and MINC2 (HDF5), written back in the flavour they came in.

One rule table decides, per (variable or group, attribute), what happens; both flavours apply it
**in place with values of the same size**, so no variable, image byte or offset moves:

* global attributes (MINC1 file attributes, MINC2 ``/minc-2.0`` attributes): ``history`` (every
  command line that touched the file, with user names and paths) and ``ident`` (user, host,
  time) and anything else are emptied; ``minc_version`` and ``class`` are kept;
* ``patient``: ``full_name`` and ``identification`` → the subject pseudonym (cut or padded with
  NUL bytes to the original length); ``sex``, ``age``, ``weight``, ``size`` kept with
  ``retain_patient_characteristics``, else emptied (a kept age over 89 years becomes 90, as
  ``090Y`` or ``90`` in the attribute's own form); ``birthdate`` and every other attribute
  emptied;
* ``study``: ``modality``, ``manufacturer``, ``model``, ``field_value``, ``software_version``
  kept; ``institution`` kept with ``retain_institution_identity``; ``station_id`` and
  ``serial_no`` kept with ``retain_device_identity``; date attributes by the date policy
  (removed; shifted with ``retain_long_modified_dates``; kept with ``retain_long_full_dates``),
  times of day kept only when dates are kept or shifted; every other attribute emptied;
* ``acquisition``: numeric attributes (repetition time, flip angle, …) kept, other text swept
  (kept when it holds none of the subject's identifiers and no generic identifier pattern: dates,
  digit runs, e-mail addresses; else cleaned character for character);
  dates and times as in ``study``; ``acquisition_id`` emptied; ``series_description`` and
  ``comments`` emptied (cleaned with ``clean_descriptors``); ``protocol`` cleaned;
* every attribute of the ``dicom_0x…`` variables/groups (DICOM elements copied by dcm2mnc) is
  emptied;
* structural attributes (``varid``, ``vartype``, ``version``, ``parent``, ``children``) are
  kept; every other attribute (dimension and image attributes, variables of other names) is kept
  when numeric and swept as in ``acquisition`` when text.

"Emptied" means NUL bytes for text and zero for numbers, at the original size.

Why no NetCDF library for MINC1: an attribute value in NetCDF-3 classic is a fixed-size run
of bytes in the header whose size the header states, so overwriting it with a value of the same
size is a byte edit that keeps every variable's ``begin`` offset valid; rewriting the file
through a library (``scipy.io.netcdf_file`` would be the maintained choice) would re-lay the
file and give no benefit.  The header is parsed here (a few dozen lines, fuzz-tested); nibabel
reads the result back in the tests.  MINC2 attributes are edited through h5py with the same
dtype and shape (HDF5 rewrites them in place); the file is then scanned for every original
value, and a file where HDF5 kept an old copy is quarantined rather than released.
"""
from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

from ..sidecar import AGE_CAP_YEARS, over_age_cap
from .base import Format, FormatError, Outputs, ScrubContext, ScrubResult

STRUCTURAL = {"varid", "vartype", "version", "parent", "children"}
_DATE = re.compile(r"(?<!\d)(\d{4})(-?)(\d{2})\2(\d{2})(?!\d)")
_MAX_MINC1_HEADER = 64 << 20


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------
def rule(var: str, attr: str, is_text: bool, ctx: ScrubContext) -> str:
    """``keep``, ``empty``, ``pseudonym``, ``date``, ``time``, ``clean``, ``descriptor`` or
    ``sweep`` (text kept only when it holds no identifier: of the subject, or a generic pattern)."""
    a = attr.lower()
    v = var.lower()
    if v in ("", "minc-2.0"):
        return "keep" if a in ("minc_version", "class") else "empty"
    if v.startswith("dicom_0x"):
        return "keep" if a in STRUCTURAL else "empty"
    if a in STRUCTURAL:
        return "keep"
    if v == "patient":
        if a in ("full_name", "identification"):
            return "pseudonym"
        if a in ("sex", "age", "weight", "size") and ctx.option("retain_patient_characteristics"):
            return "age" if a == "age" else "keep"
        return "empty"
    if v in ("study", "acquisition"):
        if "date" in a:
            return "date"
        if "time" in a and is_text:
            return "time"
        if v == "study":
            if a in ("modality", "manufacturer", "model", "field_value", "software_version"):
                return "keep"
            if a == "institution" and ctx.option("retain_institution_identity"):
                return "keep"
            if a in ("station_id", "serial_no") and ctx.option("retain_device_identity"):
                return "keep"
            return "empty"
        if a in ("acquisition_id",):
            return "empty"
        if a in ("series_description", "comments"):
            return "descriptor"
        if a == "protocol":
            return "clean"
        return "sweep" if is_text else "keep"
    return "sweep" if is_text else "keep"


def new_text(action: str, value: bytes, ctx: ScrubContext, res: ScrubResult, label: str) -> bytes | None:
    """Same-length replacement bytes for a text attribute, or None to keep it."""
    n = len(value)
    text = value.split(b"\x00", 1)[0].decode("latin-1")
    if action == "keep" or not text.strip():
        return None
    if action == "age":  # kept, but an age over 89 is an identifier (HIPAA Safe Harbor): 90
        if not over_age_cap(text.strip()):
            return None
        res.act(label, "capped")
        dicom_form = re.fullmatch(r"\d{3}[DWMY]", text.strip().upper())
        return _fit((f"{AGE_CAP_YEARS:03d}Y" if dicom_form else str(AGE_CAP_YEARS)).encode("ascii"), n)
    if action == "pseudonym":
        res.found(label, text)
        res.act(label, "replaced")
        return _fit(ctx.subject.encode("ascii"), n)
    if action == "date":
        res.found(label, text)
        if ctx.date_policy == "keep":
            return None
        if ctx.date_policy == "shift" and _DATE.search(text):
            def sh(m: re.Match) -> str:
                new = ctx.date(m.group(1) + m.group(3) + m.group(4))
                if not new:
                    return "0" * len(m.group())
                sep = m.group(2)
                return f"{new[:4]}{sep}{new[4:6]}{sep}{new[6:]}"
            res.act(label, "shifted")
            return _fit(_DATE.sub(sh, text).encode("latin-1"), n)
        res.act(label, "emptied")
        return bytes(n)
    if action == "time":
        if ctx.date_policy in ("keep", "shift"):
            return None
        res.found(label, text)
        res.act(label, "emptied")
        return bytes(n)
    if action == "sweep":  # technical text (units, dimorder, an acquisition's settings) stays as it is
        from ..textclean import restore_decimals  # (its numbers too: an embedded transform's matrix)
        cleaned = restore_decimals(value.decode("latin-1"),
                                   ctx.clean_fixed_bytes(value).decode("latin-1")).encode("latin-1")
        if cleaned == value:
            return None
        # (not recorded as found: what it removes is the subject's known values or generic patterns,
        # and the whole text is no identifier; its words as a "name" would withhold clean files)
        res.act(label, "cleaned")
        return cleaned
    if action == "clean" or (action == "descriptor" and ctx.option("clean_descriptors")):
        cleaned = ctx.clean_fixed_bytes(value)
        if cleaned != value:
            res.found(label, text)
        res.act(label, "cleaned")
        return cleaned
    res.found(label, text)
    res.act(label, "emptied")
    return bytes(n)


_NC_NUMBERS = {1: ">i1", 3: ">i2", 4: ">i4", 5: ">f4", 6: ">f8"}  # NetCDF-3 byte, short, int, float, double


def _cap_numeric_age(header: bytearray, start: int, n: int, typ: int, res: ScrubResult, label: str) -> None:
    """A numeric MINC1 age attribute over 89 years becomes 90, in place."""
    import numpy as np
    dt = _NC_NUMBERS.get(typ)
    if dt is None or n % np.dtype(dt).itemsize:
        return
    capped = _capped_ages(np.frombuffer(bytes(header[start:start + n]), dt))
    if capped is not None:
        header[start:start + n] = capped.tobytes()
        res.act(label, "capped")


def _without_identifiers(val, ctx: ScrubContext):
    """Numbers (an array) with each that writes an identifier of the subject (an MRN or a birth
    date stored as a number) set to 0, in their dtype; None when none does."""
    if val.dtype.kind not in "iuf" or not val.size:
        return None
    hits = ctx.identifying_numbers(val.ravel().tolist())
    if not hits:
        return None
    out = val.copy().ravel()
    out[hits] = 0
    return out.reshape(val.shape).astype(val.dtype)


def _capped_ages(val):
    """Numeric ages (an array) with every one over 89 years as 90, in their dtype; None when
    none is over 89 (MINC1 header bytes and MINC2 attributes alike)."""
    import numpy as np
    if val.dtype.kind not in "iuf" or not (val >= AGE_CAP_YEARS).any():
        return None
    return np.minimum(val, AGE_CAP_YEARS).astype(val.dtype)


def _fit(data: bytes, n: int) -> bytes:
    return (data + bytes(n))[:n]


def _all_found(res: ScrubResult) -> list[bytes]:
    return [v.encode("latin-1", "replace") for v in res.identifiers.values() if len(v) >= 4]


# ------------------------------------------------------------------------------------------------
# MINC1: NetCDF-3 classic header, parsed and edited in place
# ------------------------------------------------------------------------------------------------
_NC_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8}


class _NC:
    """Positions of every attribute value in a NetCDF-3 classic header."""

    def __init__(self, data: bytes, file_size: int):
        self.data = data
        self.pos = 0
        if data[:3] != b"CDF" or data[3:4] not in (b"\x01", b"\x02"):
            raise FormatError("not a NetCDF classic (MINC1) file")
        self.offset64 = data[3] == 2
        self.pos = 8  # magic + numrecs
        self.attrs: list[tuple[str, str, int, int, int]] = []  # (var, name, type, value start, nbytes)
        self.var_extents: list[tuple[int, int]] = []
        self.var_types: list[tuple[str, int, int]] = []  # (name, nc_type, vsize)
        ndims = self._list(0x0A)
        for _ in range(ndims):
            self._name()
            self._int()
        self._attrs("")
        nvars = self._list(0x0B)
        for _ in range(nvars):
            name = self._name()
            nd = self._int()
            if nd < 0 or nd > 1024:
                raise FormatError("MINC1 header: implausible variable rank")
            self.pos += 4 * nd
            self._attrs(name)
            nc_type = self._int()
            vsize = self._uint()
            self.var_types.append((name, nc_type, vsize))
            begin = self._offset()
            if begin > file_size:
                raise FormatError("truncated MINC1 file: a variable starts past the end of the file")
            self.var_extents.append((begin, vsize))
        self.header_end = self.pos

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError("MINC1 header truncated or damaged")

    def _int(self) -> int:
        self._need(4)
        v = struct.unpack(">i", self.data[self.pos:self.pos + 4])[0]
        self.pos += 4
        return v

    def _uint(self) -> int:
        self._need(4)
        v = struct.unpack(">I", self.data[self.pos:self.pos + 4])[0]
        self.pos += 4
        return v

    def _offset(self) -> int:
        if self.offset64:
            self._need(8)
            v = struct.unpack(">q", self.data[self.pos:self.pos + 8])[0]
            self.pos += 8
            return v
        return self._int()

    def _list(self, tag: int) -> int:
        t, n = self._int(), self._int()
        if t == 0 and n == 0:
            return 0
        if t != tag or n < 0 or n > 1 << 16:
            raise FormatError("MINC1 header: malformed dimension/attribute/variable list")
        return n

    def _name(self) -> str:
        n = self._int()
        if n < 0 or n > 1 << 16:
            raise FormatError("MINC1 header: implausible name length")
        self._need(n)
        name = self.data[self.pos:self.pos + n].decode("latin-1")
        self.pos += (n + 3) & ~3
        return name

    def _attrs(self, var: str) -> None:
        for _ in range(self._list(0x0C)):
            name = self._name()
            typ, nelems = self._int(), self._int()
            if typ not in _NC_SIZES or nelems < 0:
                raise FormatError("MINC1 header: attribute of unknown type")
            nbytes = nelems * _NC_SIZES[typ]
            self._need(nbytes)
            self.attrs.append((var, name, typ, self.pos, nbytes))
            self.pos += (nbytes + 3) & ~3


def _read_minc1_header(path: Path) -> tuple[bytes, _NC]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        data = fh.read(min(size, _MAX_MINC1_HEADER))
    nc = _NC(data, size)
    for begin, vsize in nc.var_extents:
        if begin + vsize > size and vsize != 0xFFFFFFFF:
            raise FormatError("truncated MINC1 file: a variable ends past the end of the file")
    # Variable data is copied as it is: besides the image only floating-point values (image-min/max,
    # dimension positions) and the one-number holders of attributes (patient, study…) are expected.
    # Text or integer arrays elsewhere (an export's notes in a char variable) are not read.
    if any(name != "image" and typ in (1, 2, 3, 4) and vsize > 4 for name, typ, vsize in nc.var_types):
        raise FormatError("MINC1: a variable other than the image holds text or integer data (not read, "
                          "not released)")
    return data, nc


def _minc1_identity(path: Path) -> dict:
    data, nc = _read_minc1_header(Path(path))
    out: dict[str, str] = {}
    want = {("patient", "identification"): "patient_id", ("patient", "full_name"): "patient_name",
            ("patient", "birthdate"): "birth_date", ("study", "start_date"): "study_date"}
    for var, name, typ, start, n in nc.attrs:
        key = want.get((var.lower(), name.lower()))
        if key and typ == 2:
            v = data[start:start + n].split(b"\x00", 1)[0].decode("latin-1").strip()
            if v:
                out[key] = v
    return out


def _minc1_scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    src, dst = Path(src), Path(dst)
    res = ScrubResult()
    data, nc = _read_minc1_header(src)
    header = bytearray(data[:nc.header_end])
    for var, name, typ, start, n in nc.attrs:
        act = rule(var, name, typ == 2, ctx)
        label = f"{var}:{name}" if var else name
        if typ == 2:
            new = new_text(act, bytes(header[start:start + n]), ctx, res, label)
            if new is not None:
                header[start:start + n] = new
        elif act == "age":
            _cap_numeric_age(header, start, n, typ, res, label)
        elif act == "keep" and (dt := _NC_NUMBERS.get(typ)) and not n % _NC_SIZES[typ]:
            import numpy as np
            clean = _without_identifiers(np.frombuffer(bytes(header[start:start + n]), dt), ctx)
            if clean is not None:
                header[start:start + n] = clean.tobytes()
                res.act(label, "emptied (a number wrote an identifier)")
        elif act in ("empty", "pseudonym", "descriptor", "date", "time") and any(header[start:start + n]):
            if act == "time" and ctx.date_policy != "remove":
                continue
            res.act(label, "emptied")
            header[start:start + n] = bytes(n)
    with Outputs() as out:
        with open(src, "rb") as fi, open(out.path(dst), "wb") as fo:
            fo.write(header)
            fi.seek(len(header))
            shutil.copyfileobj(fi, fo, 1 << 22)
        res.outputs = out.finals
    return res


# ------------------------------------------------------------------------------------------------
# MINC2: HDF5 attributes through h5py
# ------------------------------------------------------------------------------------------------
def _h5_items(f):
    """(group label, object) for the root MINC group and every object below it."""
    import h5py
    root = f.get("minc-2.0")
    if not isinstance(root, h5py.Group):
        raise FormatError("HDF5 file without a /minc-2.0 group (not MINC2)")
    items = [("", f), ("minc-2.0", root)]  # the file's root attributes follow the global rule too
    root.visititems(lambda name, obj: items.append((name.rsplit("/", 1)[-1], obj)))
    return items


def _check_objects(f) -> None:
    """Refuse what the attribute rules cannot clean: HDF5 objects outside ``/minc-2.0`` and
    datasets holding data other than the image (``image/<n>/image``, ``image-min``,
    ``image-max``), numeric dimension variables and the scalar holders of ``info`` attributes.
    Their bytes are copied as they are, compressed ones are unreadable to the leak scan, so a
    text dataset (an export's notes) would be released unseen.  The reason names no object."""
    import h5py
    if any(name != "minc-2.0" for name in f):
        raise FormatError("MINC2: HDF5 objects outside /minc-2.0 (not read, not released)")
    bad: list[str] = []

    def visit(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split("/")
        size = obj.size if obj.shape is not None else 0
        numeric = obj.dtype.kind in "fiub"
        if len(parts) == 3 and parts[0] == "image" and parts[2] in ("image", "image-min", "image-max"):
            return
        if len(parts) == 2 and parts[0] == "dimensions" and (obj.dtype.kind == "f" or size <= 1):
            return
        if parts[0] == "info" and size <= 1 and numeric:
            return
        bad.append(name)
    f["minc-2.0"].visititems(visit)
    if bad:
        raise FormatError(f"MINC2: {len(bad)} dataset(s) other than the image, dimensions and attribute "
                          "holders (not read, not released)")


def _open_h5(path: Path, mode: str = "r"):
    import h5py
    try:
        return h5py.File(path, mode)
    except Exception as exc:  # OSError and friends for damaged HDF5
        raise FormatError(f"MINC2 (HDF5) file unreadable ({type(exc).__name__})") from None


def _minc2_identity(path: Path) -> dict:
    out: dict[str, str] = {}
    with _open_h5(Path(path)) as f:
        info = f.get("minc-2.0/info")
        try:
            _h5_items(f)
            for group, attr, key in (("patient", "identification", "patient_id"), ("patient", "full_name", "patient_name"),
                                     ("patient", "birthdate", "birth_date"), ("study", "start_date", "study_date")):
                obj = info.get(group) if info is not None else None
                if obj is not None and attr in obj.attrs:
                    v = obj.attrs[attr]
                    v = v.decode("latin-1") if isinstance(v, bytes) else str(v)
                    if v.strip("\x00 "):
                        out[key] = v.strip("\x00 ")
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(f"MINC2 header unreadable ({type(exc).__name__})") from None
    return out


def _minc2_scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    import numpy as np
    src, dst = Path(src), Path(dst)
    res = ScrubResult()
    with _open_h5(src) as f:  # validate before copying
        _h5_items(f)
        _check_objects(f)
    with Outputs() as out:
        tmp = out.path(dst)
        shutil.copyfile(src, tmp)
        with _open_h5(tmp, "r+") as f:
            try:
                for group, obj in _h5_items(f):
                    for name in list(obj.attrs):
                        aid = obj.attrs.get_id(name)
                        dt = aid.dtype
                        is_text = dt.kind == "S"
                        act = rule(group, name, dt.kind in "SOU", ctx)  # (variable-length text is text too)
                        label = f"{group}:{name}" if group not in ("", "minc-2.0") else name
                        if is_text and dt.itemsize and aid.shape == ():
                            val = obj.attrs[name]
                            raw = bytes(val) if isinstance(val, (bytes, np.bytes_)) else bytes(np.asarray(val).tobytes())
                            raw = _fit(raw, dt.itemsize)
                            new = new_text(act, raw, ctx, res, label)
                            if new is not None:
                                obj.attrs.modify(name, np.array(new, dtype=dt))
                        elif act == "keep" and (clean := _without_identifiers(np.asarray(obj.attrs[name]),
                                                                                ctx)) is not None:
                            obj.attrs.modify(name, clean.astype(dt))
                            res.act(label, "emptied (a number wrote an identifier)")
                        elif act == "keep" or (act == "time" and ctx.date_policy != "remove"):
                            continue
                        elif act == "age":
                            if (capped := _capped_ages(np.asarray(obj.attrs[name]))) is not None:
                                obj.attrs.modify(name, capped.astype(dt))
                                res.act(label, "capped")
                        else:
                            val = np.asarray(obj.attrs[name])
                            if val.dtype.kind in "OSUV":
                                res.found(label, str(val)[:200])
                                obj.attrs.modify(name, np.zeros(val.shape, dtype=dt) if dt.kind != "O" else
                                                 np.array([""] * max(1, val.size), dtype=dt).reshape(val.shape))
                                res.act(label, "emptied")
                            elif val.any():
                                obj.attrs.modify(name, np.zeros_like(val))
                                res.act(label, "emptied")
            except FormatError:
                raise
            except Exception as exc:
                raise FormatError(f"MINC2 attributes could not be rewritten ({type(exc).__name__})") from None
        _rewrite_h5(tmp)
        blob = tmp.read_bytes()
        left = [v for v in _all_found(res) if v in blob]
        if left:
            raise FormatError(f"MINC2: {len(left)} original attribute value(s) still present after rewriting")
        res.outputs = out.finals
    return res


def _rewrite_h5(path: Path) -> None:
    """Rewrite the HDF5 file at ``path`` object by object with no object times (HDF5 stamps every
    object with its creation moment, the acquisition's in a scanner export) and without the
    free space where edited attributes used to be: same groups, datasets (shape, type, chunks,
    filters, values) and attributes, reproducible bytes."""
    import os

    import h5py
    import numpy as np
    tmp = path.with_name(path.name + ".rewrite")

    def attrs(src, dst) -> None:
        for name in src.attrs:
            aid = src.attrs.get_id(name)
            dst.attrs.create(name, src.attrs[name], dtype=aid.dtype)

    def copy(src, dst) -> None:
        for name in src:
            link = src.get(name, getlink=True)
            if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                raise FormatError("MINC2: links to other objects or files are not supported")
            obj = src[name]
            if isinstance(obj, h5py.Group):
                gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
                gcpl.set_obj_track_times(False)
                sub = h5py.Group(h5py.h5g.create(dst.id, name.encode(), gcpl=gcpl))
                attrs(obj, sub)
                copy(obj, sub)
            else:
                data = obj[()] if obj.shape is not None else h5py.Empty(obj.dtype)
                kw = {}
                if obj.chunks is not None:
                    kw = {"chunks": obj.chunks, "compression": obj.compression,
                          "compression_opts": obj.compression_opts, "shuffle": obj.shuffle,
                          "fletcher32": obj.fletcher32, "maxshape": obj.maxshape}
                new = dst.create_dataset(name, shape=obj.shape, dtype=obj.dtype,
                                         data=data if obj.shape != () or not isinstance(data, np.ndarray) else data,
                                         track_times=False, **kw)
                attrs(obj, new)
    try:
        with h5py.File(path, "r") as src, h5py.File(tmp, "w", libver="earliest", track_order=False) as dst:
            attrs(src, dst)
            copy(src, dst)
        os.replace(tmp, path)
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"MINC2 file could not be rewritten ({type(exc).__name__})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def companions(path: Path) -> list[Path]:
    return []


def extension(path: Path) -> str:
    return ".mnc"


FORMATS = {
    "minc1": Format(name="minc1", release_dir="minc", identity=_minc1_identity, companions=companions,
                    scrub=_minc1_scrub, extension=extension),
    "minc2": Format(name="minc2", release_dir="minc", identity=_minc2_identity, companions=companions,
                    scrub=_minc2_scrub, extension=extension),
}
