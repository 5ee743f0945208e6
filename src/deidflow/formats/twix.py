"""Siemens raw data (twix ``.dat``): VB (one measurement) and VD/VE/XA (multi-raid).

Every ASCII header buffer of every measurement (Config, Dicom, Meas, MeasYaps, Phoenix, Spice,
whatever their names) is edited **in place with values of the same length**, so buffer
lengths, measurement offsets and the MDH/k-space stream stay byte-identical; the file is copied
and only header bytes are rewritten.  Rules (by parameter name, in XProtocol ``<Param…."Name">
{ … }`` blocks and in ``### ASCCONV`` lines alike):

* patient name and ID → the subject pseudonym, cut or padded with ``X`` to the original length;
  the multi-raid header's per-measurement patient name → the pseudonym, NUL-padded;
* birth date, referring/performing physicians, operators → ``x`` (Siemens' own masking);
* sex, age, weight, height → ``x``/``0`` unless ``retain_patient_characteristics`` (which keeps an age
  over 89 years as 90, same length);
* institution name/address → ``x`` unless ``retain_institution_identity``; device serial
  number and station name → keyed digits / ``x`` unless ``retain_device_identity``;
* LOIDs, UIDs (frame of reference, reference images, the DICOM UID root with the serial
  number, exam-memory UIDs with their date) and every other dotted UID-like value anywhere in
  the headers → keyed values of the same length and dot pattern (unless ``retain_uids``);
* study description → ``x`` (cleaned with ``clean_descriptors``); protocol names (the
  multi-raid header's and the buffers') → cleaned of identifiers and generic identifier
  patterns, character for character.

Finally every original value found above (≥ 4 characters) is searched for in all header bytes
and overwritten wherever it still occurs.  Bytes no reader reads (after the raid directory's
entries, after a measurement's ACQEND scan, after the last measurement; a raid entry's patient
name field after its end) are zeroed: scanner files hold zeros there.  The file is checked first: the raid directory must
lie inside the file and every measurement's MDH stream must reach its ACQEND scan, so a file
cut in the middle is quarantined.
"""
from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

from .base import Format, FormatError, Outputs, ScrubContext, ScrubResult

MAX_HEADER = 256 << 20
MAX_MEASUREMENTS = 64
RAID_ENTRY = 152

# lower-cased parameter name -> rule
_RULES: dict[str, str] = {}
for _n in ("tpatientname", "patientname", "patientsname"):
    _RULES[_n] = "name"
for _n in ("patientid", "tpatientid", "patientsid"):
    _RULES[_n] = "id"
for _n in ("patientbirthday", "patientbirthdate", "tpatientbirthday", "tperfphysiciansname",
           "performingphysiciansname", "referringphysiciansname", "treferringphysician",
           "referringphysician", "operatorsname", "toperatorsname", "patientsaddress", "otherpatientids",
           "additionalpatienthistory", "patientcomments", "requestingphysician"):
    _RULES[_n] = "remove"
for _n in ("patientsex", "lpatientsex", "flpatientage", "patientage", "flusedpatientweight",
           "flpatientweight", "patientweight", "flpatientheight", "patientheight", "patientsize"):
    _RULES[_n] = "characteristic"
for _n in ("institutionname", "institutionaddress", "tinstitutionname", "institutionaldepartmentname"):
    _RULES[_n] = "institution"
for _n in ("deviceserialnumber", "serialnumber", "stationname", "tstationname"):
    _RULES[_n] = "device"
for _n in ("patientloid", "studyloid", "seriesloid", "patientloid", "studyloids4split", "seriesloids4split",
           "studyloids4splitandpause", "seriesloids4splitandpause", "mppsloids4split", "mppsloids4splitandpause",
           "defaultseriesloid", "defaultseriesloids4split", "parentloid", "patient", "study", "studyloid",
           "patientloid", "tcurrentmppsloid", "exammemoryuid", "frameofreference", "tframeofreference",
           "dicom_uid_root", "studyinstanceuid", "seriesinstanceuid", "measuid_string"):
    _RULES[_n] = "uid"
for _n in ("tstudydescription", "studydescription", "studycomments", "admittingdiagnosesdescription"):
    _RULES[_n] = "descriptor"
for _n in ("tprotocolname", "protocolname", "tseriesdescription", "seriesdescription"):
    _RULES[_n] = "protocol"
_RULES_RE_UID = re.compile(r"^t?referenceimage\d+$|loid|uid$")

def _capped_age(number: str) -> str:
    """An age in years over 89 as 90, at the same length (97.000000 -> 90.000000, 101 -> 090)."""
    from ..sidecar import AGE_CAP_YEARS, over_age_cap
    if not over_age_cap(number):
        return number
    decimals = len(number.split(".", 1)[1]) if "." in number else 0
    return f"{AGE_CAP_YEARS:.{decimals}f}".rjust(len(number), "0")[-len(number):]


_PARAM = re.compile(r'<Param\w*\."([^"]{1,128})">')
_ASCCONV = re.compile(r"### ASCCONV BEGIN.*?### ASCCONV END ###", re.S)
_ASC_LINE = re.compile(r"^([^\n=]{1,200}?)[ \t]*=[ \t]*([^\n]*)$", re.M)
_QUOTED = re.compile(r'"([^"\n]*)"')
_TAGGED = re.compile(r"<(\w+)>\s*$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_PRECISION = re.compile(r"<Precision>\s*\d+")
# UID-like: digits with at least two dots (LOIDs, UIDs) or 4+ underscore-joined digit groups.
_UIDISH = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?![\w.])|(?<![\w.])\d+(?:_\d+){3,}(?![\w.])")
_MASKED = re.compile(r"^[xX*\s]*$")


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------
class _Meas:
    def __init__(self, index: int, offset: int, length: int | None, entry_offset: int | None):
        self.index, self.offset, self.length, self.entry_offset = index, offset, length, entry_offset
        self.hdr_len = 0
        self.buffers: list[tuple[str, int, int]] = []  # (name, content start, content length), absolute
        self.data_end = offset  # where its ACQEND scan ends


def _layout(fh, size: int) -> tuple[str, list[_Meas]]:
    head = fh.read(32)
    if len(head) < 16:
        raise FormatError("truncated twix file (no header)")
    a, b = struct.unpack("<II", head[:8])
    if a == 0 and 1 <= b <= MAX_MEASUREMENTS:
        version = "VD"
        fh.seek(8)
        table = fh.read(b * RAID_ENTRY)
        if len(table) < b * RAID_ENTRY:
            raise FormatError("truncated twix file (raid directory incomplete)")
        meas = []
        for i in range(b):
            _mid, _fid, off, ln = struct.unpack("<IIQQ", table[i * RAID_ENTRY:i * RAID_ENTRY + 24])
            if off + ln > size:
                raise FormatError(f"truncated twix file: measurement {i + 1} of {b} ends past the end of the file")
            if off < 8 + b * RAID_ENTRY:
                raise FormatError(f"twix raid directory: measurement {i + 1} starts inside the directory")
            meas.append(_Meas(i, off, ln, 8 + i * RAID_ENTRY))
    elif head[8:15] == b"Config\x00":
        version = "VB"
        meas = [_Meas(0, 0, None, None)]
    else:
        raise FormatError("not a Siemens twix file (neither a raid directory nor a VB header)")
    for m in meas:
        fh.seek(m.offset)
        h = fh.read(8)
        if len(h) < 8:
            raise FormatError(f"truncated twix file: measurement {m.index + 1} header missing")
        m.hdr_len, nbuf = struct.unpack("<II", h)
        end = m.offset + m.hdr_len
        if m.hdr_len < 8 or m.hdr_len > MAX_HEADER or end > size or (m.length is not None and m.hdr_len > m.length):
            raise FormatError(f"twix measurement {m.index + 1}: header length outside the file")
        if nbuf > 64:
            raise FormatError(f"twix measurement {m.index + 1}: implausible number of header buffers")
        fh.seek(m.offset + 8)
        blob = fh.read(m.hdr_len - 8)
        pos = 0
        for _ in range(nbuf):
            z = blob.find(b"\x00", pos, pos + 64)
            if z < 0 or z + 5 > len(blob):
                raise FormatError(f"twix measurement {m.index + 1}: header buffer table damaged")
            name = blob[pos:z].decode("latin-1")
            n = struct.unpack("<I", blob[z + 1:z + 5])[0]
            start = z + 5
            if start + n > len(blob):
                raise FormatError(f"twix measurement {m.index + 1}: header buffer runs past the header")
            m.buffers.append((name, m.offset + 8 + start, n))
            pos = start + n
    return version, meas


def _check_mdh(fh, version: str, m: _Meas, size: int) -> int:
    """Walk the measurement's scans to its ACQEND; FormatError when the stream is cut.  Returns
    where the ACQEND scan ends (what follows up to the measurement's end no reader reads)."""
    pos = m.offset + m.hdr_len
    end = size if m.length is None else m.offset + m.length
    hsize = 128 if version == "VB" else 192
    eval_at = 20 if version == "VB" else 40
    for _ in range(max(1, (end - pos) // 32) + 1):
        if pos + hsize > end:
            raise FormatError(f"truncated twix file: measurement {m.index + 1} ends inside its raw data")
        fh.seek(pos)
        h = fh.read(hsize)
        if len(h) < hsize:
            raise FormatError(f"truncated twix file: measurement {m.index + 1} ends inside its raw data")
        dma = struct.unpack("<I", h[:4])[0] & 0x1FFFFFF
        mask = struct.unpack("<I", h[eval_at:eval_at + 4])[0]
        if mask & 1:  # ACQEND
            return min(end, pos + max(hsize, dma))
        if dma < hsize:
            if version == "VD" and dma == 0:  # some VD scans carry no DMA length: channel headers follow
                raise FormatError(f"twix measurement {m.index + 1}: scan without a length before ACQEND")
            raise FormatError(f"twix measurement {m.index + 1}: scan length shorter than its header")
        pos += dma
    raise FormatError(f"twix measurement {m.index + 1}: no ACQEND scan")


def _read_layout(path: Path) -> tuple[str, list[_Meas], int]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        version, meas = _layout(fh, size)
        for m in meas:
            m.data_end = _check_mdh(fh, version, m, size)
    return version, meas, size


def _unread(meas: list[_Meas], size: int) -> list[tuple[int, int]]:
    """Byte ranges no twix reader reads: after the raid directory's entries up to the first
    measurement, after each measurement's ACQEND scan up to the next measurement, after the last
    one (zero in scanner files; an export could put anything there)."""
    out, pos = [], 0
    if meas and meas[0].entry_offset is not None:  # VD/VE: the raid directory's used entries
        pos = 8 + len(meas) * RAID_ENTRY
    for m in sorted(meas, key=lambda m: m.offset):
        if m.offset > pos:
            out.append((pos, m.offset))
        pos = max(pos, m.data_end)
    if size > pos:
        out.append((pos, size))
    return out


# ------------------------------------------------------------------------------------------------
# Identity
# ------------------------------------------------------------------------------------------------
def _value_quotes(body: str):
    """Quoted strings of a block that are values (not ``<Visible> "true"``-style attributes;
    ``<Default>`` values count as values)."""
    for q in _QUOTED.finditer(body):
        tag = _TAGGED.search(body, max(0, q.start() - 40), q.start())
        if tag and tag.group(1) != "Default":
            continue
        yield q


def _sub_values(body: str, fn) -> str:
    out, last = [], 0
    for q in _value_quotes(body):
        out.append(body[last:q.start(1)])
        out.append(fn(q.group(1)))
        last = q.end(1)
    out.append(body[last:])
    return "".join(out)


def _param_values(text: str, names: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in _PARAM.finditer(text):
        key = m.group(1).lower()
        if key in names and key not in out:
            span = _block(text, m.end())
            if span:
                for q in _value_quotes(text[span[0]:span[1]]):
                    if q.group(1).strip() and not _MASKED.match(q.group(1)):
                        out[key] = q.group(1).strip()
                        break
    return out


def identity(path: Path) -> dict:
    """PatientID, patient name and birth date from the first measurement's headers (Siemens'
    masked ``xxxx`` values count as absent)."""
    path = Path(path)
    _version, meas, _size = _read_layout(path)
    out: dict[str, str] = {}
    with open(path, "rb") as fh:
        for m in meas:
            for _name, start, n in m.buffers:
                fh.seek(start)
                text = fh.read(n).decode("latin-1")
                vals = _param_values(text, {"patientid", "tpatientname", "patientname", "patientbirthday"})
                for src, dst in (("patientid", "patient_id"), ("tpatientname", "patient_name"),
                                 ("patientname", "patient_name"), ("patientbirthday", "birth_date")):
                    if src in vals:
                        out.setdefault(dst, vals[src])
    return out


def companions(path: Path) -> list[Path]:
    return []


def extension(path: Path) -> str:
    return ".dat"


# ------------------------------------------------------------------------------------------------
# Scrubbing
# ------------------------------------------------------------------------------------------------
def _block(text: str, pos: int) -> tuple[int, int] | None:
    """(start, end) of the ``{ … }`` block that follows ``pos`` (balanced), or None."""
    i = pos
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    if i >= n or text[i] != "{":
        return None
    depth = 0
    j = i
    in_quote = False
    while j < n:
        c = text[j]
        if c == '"':
            in_quote = not in_quote
        elif not in_quote:
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return i + 1, j
        j += 1
    return None


class _Scrubber:
    def __init__(self, ctx: ScrubContext, res: ScrubResult):
        self.ctx, self.res = ctx, res
        self.found: set[str] = set()

    def rule(self, name: str) -> str | None:
        key = name.lower().split(".")[-1]
        key = re.sub(r"\[\d+\]$", "", key)
        r = _RULES.get(key)
        if r is None and _RULES_RE_UID.search(key) and key != "measuid":
            r = "uid"
        if r == "characteristic" and self.ctx.option("retain_patient_characteristics"):
            return "age" if key.endswith("age") else None  # kept; an age over 89 capped
        if r == "institution" and self.ctx.option("retain_institution_identity"):
            return None
        if r == "device" and self.ctx.option("retain_device_identity"):
            return None
        if r == "uid" and self.ctx.option("retain_uids"):
            return None
        return r

    def value(self, rule: str, name: str, v: str) -> str:
        """Equal-length replacement of one string value under ``rule``."""
        if not v.strip() or _MASKED.match(v):
            return v
        self.res.found(name, v)
        if len(v.strip()) >= 4:
            self.found.add(v.strip())
        if rule == "age":
            return _capped_age(v)
        if rule in ("name", "id"):
            self.res.act(name, "replaced")
            return self.ctx.pseudonym_of_length(len(v))
        if rule == "uid" and re.fullmatch(r"[\d._\s]+", v):
            self.res.act(name, "replaced")
            return _keyed_same_length(self.ctx, v)
        if rule == "device" and v.strip().isdigit():
            self.res.act(name, "replaced")
            return _keyed_same_length(self.ctx, v)
        if rule == "protocol" or (rule == "descriptor" and self.ctx.option("clean_descriptors")):
            self.res.act(name, "cleaned")
            return self.ctx.clean_fixed(v)
        self.res.act(name, "removed")
        return "x" * len(v)

    def block(self, rule: str, name: str, body: str) -> str:
        if rule == "age":  # the numbers after <Precision>: an age over 89 years becomes 90
            kept = _PRECISION.sub(lambda m: "\0" * len(m.group()), body)
            out = body
            for m in _NUMBER.finditer(kept):
                if "\0" not in m.group() and (new := _capped_age(m.group())) != m.group():
                    self.res.act(name, "capped")
                    out = out[:m.start()] + new + out[m.end():]
            return out
        if rule == "characteristic":
            kept = _PRECISION.sub(lambda m: "\0" * len(m.group()), body)
            kept = _QUOTED.sub(lambda m: "\0" * len(m.group()), kept)
            out = list(body)
            for m in _NUMBER.finditer(kept):
                if "\0" in m.group():
                    continue
                self.res.act(name, "removed")
                self.res.found(name, m.group())
                for k in range(m.start(), m.end()):
                    if out[k].isdigit():
                        out[k] = "0"
            body = "".join(out)
        return _sub_values(body, lambda v: self.value(rule, name, v))

    def text(self, text: str) -> str:
        out = text
        # XProtocol parameter blocks
        pieces, last = [], 0
        for m in _PARAM.finditer(text):
            if m.start() < last:
                continue
            rule = self.rule(m.group(1))
            if rule is None:
                continue
            span = _block(text, m.end())
            if span is None:
                continue
            pieces.append(text[last:span[0]])
            pieces.append(self.block(rule, m.group(1), text[span[0]:span[1]]))
            last = span[1]
        pieces.append(text[last:])
        out = "".join(pieces)
        # ASCCONV sections (key = value lines)
        out = _ASCCONV.sub(lambda m: _ASC_LINE.sub(self._asc_line, m.group(0)), out)
        return out

    def _asc_line(self, m: re.Match) -> str:
        key, val = m.group(1).strip(), m.group(2)
        rule = self.rule(key)
        if rule is None:
            return m.group(0)
        start = m.start(2) - m.start(0)
        line = m.group(0)
        if '"' in val:
            new = _QUOTED.sub(lambda q: '"' + self.value(rule, key, q.group(1)) + '"', val)
        elif rule == "characteristic":
            new = re.sub(r"\d", "0", val)
            if new != val:
                self.res.act(key, "removed")
        elif rule == "age":
            new = _NUMBER.sub(lambda n: _capped_age(n.group()), val)
        else:
            new = self.value(rule, key, val)
        return line[:start] + new

    def sweep(self, text: str) -> str:
        """UID-like values anywhere, then every original value found anywhere."""
        if not self.ctx.option("retain_uids"):
            def uid(m: re.Match) -> str:
                self.res.act("UID-like values", "replaced")
                return _keyed_same_length(self.ctx, m.group())
            text = _UIDISH.sub(uid, text)
        for v in sorted(self.found, key=len, reverse=True):
            if v in text:
                text = text.replace(v, "x" * len(v))
                self.res.act("original values elsewhere", "removed")
        return text


def _keyed_same_length(ctx: ScrubContext, v: str) -> str:
    """Keyed replacement keeping length and the positions of non-digits (dots, underscores)."""
    digits = ctx.pseudo.same_length_uid(re.sub(r"\D", ".", v))
    return "".join(d if c.isdigit() else c for c, d in zip(v, digits))


def scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    src, dst = Path(src), Path(dst)
    res = ScrubResult()
    version, meas, size = _read_layout(src)
    s = _Scrubber(ctx, res)
    with Outputs() as out:
        tmp = out.path(dst)
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 22)
        with open(src, "rb") as fi, open(tmp, "r+b") as fo:
            edits: list[tuple[int, bytes]] = []
            for m in meas:
                for _name, start, n in m.buffers:
                    fi.seek(start)
                    raw = fi.read(n)
                    text = raw.decode("latin-1")
                    new = s.text(text)
                    edits.append((start, new.encode("latin-1")))
                if m.entry_offset is not None:
                    fi.seek(m.entry_offset + 24)
                    pat, prot = fi.read(64), fi.read(64)
                    pname = pat.split(b"\x00", 1)[0].decode("latin-1")
                    if pat[len(pname) + 1:].strip(b"\x00"):  # bytes after the name's end: nobody's field
                        edits.append((m.entry_offset + 24 + len(pname), bytes(64 - len(pname))))
                        res.act("raid:patient_name", "cleared after its end")
                    if pname.strip() and not _MASKED.match(pname):
                        res.found("raid:patient_name", pname)
                        if len(pname.strip()) >= 4:
                            s.found.add(pname.strip())
                        new_pat = ctx.subject.encode("ascii")[:63]
                        edits.append((m.entry_offset + 24, new_pat + bytes(64 - len(new_pat))))
                        res.act("raid:patient_name", "replaced")
                    pn = prot.split(b"\x00", 1)[0]
                    if pn.strip():
                        cleaned = ctx.clean_fixed(pn.decode("latin-1")).encode("latin-1")
                        edits.append((m.entry_offset + 88, cleaned + bytes(64 - len(cleaned))))
            # second pass: the sweep over the edited buffers (values found anywhere, UIDs)
            # after all buffers: sweep every edited region (values found in any buffer, UIDs)
            for start, data in edits:
                fo.seek(start)
                fo.write(s.sweep(data.decode("latin-1")).encode("latin-1"))
            for a, b in _unread(meas, size):
                fi.seek(a)
                if fi.read(b - a).strip(b"\x00"):
                    fo.seek(a)
                    fo.write(bytes(b - a))
                    res.act("bytes outside the measurements", "zeroed")
        if tmp.stat().st_size != size:
            raise FormatError("internal error: twix size changed")  # never: every edit keeps its length
        res.outputs = out.finals
    return res


FORMAT = Format(name="twix", release_dir="twix", identity=identity, companions=companions, scrub=scrub,
                extension=extension)
