"""
Reading text corpora, for data/text/prepare.py: the inputs (files, directories, globs,
Hugging Face datasets), their formats (plain text, jsonl, json arrays, parquet, each
optionally compressed), text under the --errors policy, and the scan that reads every input
once to count documents and find bad ones. Every reader yields documents as pieces of text,
so memory stays bounded by a few MB whatever a file or a JSON string's size.
"""
import bz2
import codecs
import fnmatch
import glob
import gzip
import io
import json
import lzma
import os
import re
import sys

from gpt_trainer.dataprep import PROGRESS, check_interrupted, progress
from gpt_trainer.errors import DataError

COMPRESSION = (".gz", ".xz", ".bz2", ".zst")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
OUTPUTS = ("train.bin", "val.bin", "meta.json", "tokenizer.json", PROGRESS, ".lock")


class BadRecord(Exception):
    """A document that cannot be read as text: offset is its byte in the (decompressed) file."""

    def __init__(self, reason, offset=None, where=None):
        super().__init__(reason)
        self.reason, self.offset, self.where = reason, offset, where

    def describe(self, name):
        where = f":{self.where}" if isinstance(self.where, int) else f": {self.where}" if self.where else ""
        at = f": byte {self.offset:,}" if self.offset is not None else ""
        return f"{name}{where}{at}: {self.reason}"


class Unreadable(BadRecord):
    """The file itself cannot be read to its end (a truncated or corrupt compressed stream, a
    damaged parquet file, an I/O error): none of it is used, never a short document."""


# ----------------------------------------------------------------------------------------
# text under the --errors policy

REPLACED = [0]  # undecodable sequences and lone surrogates replaced (this process)
SURROGATE = re.compile("[\ud800-\udfff]")


def _count_replace(e):
    REPLACED[0] += 1
    return "\ufffd", e.end


codecs.register_error("prepare-replace", _count_replace)


def decode(raw, offset, replace, where=None):
    if replace:
        return raw.decode("utf-8", "prepare-replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", offset + e.start, where)


def fix_surrogates(text, replace, offset, where):
    """JSON can spell lone surrogates ("\\ud800"), which no encoding can write as UTF-8."""
    m = SURROGATE.search(text)
    if m is None:
        return text
    if not replace:
        raise BadRecord(f"lone surrogate U+{ord(m.group()):04X} in the text", offset, where)
    REPLACED[0] += len(SURROGATE.findall(text))
    return SURROGATE.sub("\ufffd", text)


def get_field(record, path):
    if isinstance(record, str):
        return record  # an array of strings: each is the text
    for key in path:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def record_text(record, opts, offset, where):
    text = get_field(record, opts.path)
    if not isinstance(text, str):
        raise BadRecord(f"no string field {opts.text_field!r}; set --text_field to the field "
                        f"holding the text (a.b for a nested one)", offset, where)
    return fix_surrogates(text, opts.replace, offset, where)


# ----------------------------------------------------------------------------------------
# inputs


def open_binary(path):
    """(readable binary stream, the raw file under it) for a maybe-compressed file. The stream
    raises Unreadable if the file cannot be read to its end: gzip, xz and bz2 say when their
    data stops before the end-of-stream marker, and zstd frames are checked by ZstdFrames."""
    raw = open(path, "rb")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".gz":
        f = gzip.GzipFile(fileobj=raw)
    elif suffix == ".xz":
        f = lzma.LZMAFile(raw)
    elif suffix == ".bz2":
        f = bz2.BZ2File(raw)
    elif suffix == ".zst":
        f = io.BufferedReader(ZstdFrames(raw, path), 1 << 20)
    else:
        f = raw
    return CheckedStream(f, suffix if f is not raw else "file"), raw


def _read_errors():
    errors = [EOFError, OSError, lzma.LZMAError]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


class CheckedStream:
    """read/readline of a (decompressing) stream whose failures (EOFError on a truncated
    stream, BadGzipFile, LZMAError, ZstdError, an I/O error) become Unreadable at the offset
    in the decompressed data where reading stopped."""
    ERRORS = _read_errors()

    def __init__(self, f, kind):
        self.f, self.kind, self.offset = f, kind, 0

    def _checked(self, fn, n):
        try:
            data = fn(n)
        except self.ERRORS as e:
            what = "read error" if self.kind == "file" else f"truncated or corrupt {self.kind[1:]} data"
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise Unreadable(f"{what} ({reason})", self.offset) from None
        self.offset += len(data)
        return data

    def read(self, n=-1):
        return self._checked(self.f.read, n)

    def readline(self, n=-1):
        return self._checked(self.f.readline, n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class ZstdFrames(io.RawIOBase):
    """The decompressed data of every zstd frame in a file. zstandard's stream_reader ends
    silently at a truncated frame (and, by default, after the first frame); this reader
    fails on a frame the file ends inside. Compressed data is fed 64 KiB at a time, which
    bounds the memory a feed can take."""

    def __init__(self, raw, path):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: .zst needs the zstandard package (pip install zstandard)")
        self.raw, self.dctx, self.frame, self.out, self.pending = raw, zstandard.ZstdDecompressor(), None, b"", b""

    def readable(self):
        return True

    def readinto(self, b):
        while not self.out:
            data, self.pending = self.pending or self.raw.read(1 << 16), b""
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            if self.frame is None or self.frame.eof:
                self.frame = self.dctx.decompressobj()
            self.out = self.frame.decompress(data)
            if self.frame.eof:
                self.pending = self.frame.unused_data  # the next frame's start
        n = min(len(b), len(self.out))
        b[:n], self.out = self.out[:n], self.out[n:]
        return n


def file_format(path):
    name = path.lower()
    if name.endswith(COMPRESSION):
        name = os.path.splitext(name)[0]
    return FORMATS.get(os.path.splitext(name)[1], "text")


class FileSource:
    def __init__(self, path):
        self.path, self.name, self.format = os.path.abspath(path), path, file_format(path)
        st = os.stat(path)
        self.size, self.mtime = st.st_size, st.st_mtime_ns
        self.compressed = path.lower().endswith(COMPRESSION)
        self.raw = None

    def identity(self):
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime}

    def position(self):
        """Bytes of the file on disk read so far (for progress)."""
        return self.raw.tell() if self.raw is not None and not self.raw.closed else self.size

    def records(self, opts, skip):
        """(record index, its text pieces: an iterator of (text, nbytes) that raises
        BadRecord if the record is bad) for each record not in skip. A BadRecord from this
        generator itself means the rest of the file cannot be read."""
        if self.format == "parquet":
            yield from parquet_records(self.path, opts, skip)
            return
        f, self.raw = open_binary(self.path)
        with f, self.raw:
            if self.format == "jsonl":
                yield from jsonl_records(f, opts, skip)
            elif self.format == "json":
                yield from json_records(f, opts, skip)
            elif 0 not in skip:
                yield 0, text_pieces(f, opts)


class DatasetSource:
    """A Hugging Face dataset: a save_to_disk dir, or hf:NAME[:CONFIG] from the hub."""

    def __init__(self, spec, split):
        import datasets
        self.name = spec
        try:
            if spec.startswith("hf:"):
                name, _, config = spec[3:].partition(":")
                ds = datasets.load_dataset(name, config or None, split=split)
            else:
                ds = datasets.load_from_disk(spec)
        except (OSError, ValueError) as e:  # not found, offline (ConnectionError), not a dataset
            raise DataError(f"--input {spec}: cannot load the dataset ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})")
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"--input {spec}: no split {split!r} (it has {', '.join(ds)}); "
                                f"set --hf_split")
            ds = ds[split]
        self.ds, self.split, self.done = ds, split, 0
        self.size = ds.data.nbytes

    def identity(self):
        return {"dataset": self.name, "split": self.split, "fingerprint": self.ds._fingerprint,
                "rows": len(self.ds)}

    def position(self):
        return min(self.done, self.size)

    def records(self, opts, skip):
        column = opts.path[0]
        if column not in self.ds.column_names:
            raise DataError(f"{self.name}: no column {column!r} (it has "
                            f"{', '.join(self.ds.column_names)}); set --text_field")
        for start in range(0, len(self.ds), 1000):
            for j, value in enumerate(self.ds[start:start + 1000][column]):
                if start + j not in skip:
                    yield start + j, self._row(value, opts, start + j)

    def _row(self, value, opts, row):
        text = record_text({opts.path[0]: value}, opts, None, f"row {row}")
        self.done += len(text)
        yield text, len(text)


def parquet_records(path, opts, skip):
    import pyarrow as pa
    import pyarrow.parquet as pq  # datasets' own parquet reader; rows in bounded batches
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise Unreadable(f"not a readable parquet file ({str(e).strip()[:160]})")
    column = opts.path[0]
    if column not in f.schema_arrow.names:
        raise DataError(f"{path}: no column {column!r} (it has {', '.join(f.schema_arrow.names)}); "
                        f"set --text_field")
    row, batches = 0, f.iter_batches(batch_size=1000, columns=[column])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:  # a damaged page: the rows after it are lost
            raise Unreadable(f"damaged parquet data after row {row:,} ({str(e).strip()[:160]})")
        if batch is None:
            return
        for value in batch.column(0).to_pylist():
            if row not in skip:
                yield row, _row_pieces({column: value}, opts, row)
            row += 1


def _row_pieces(record, opts, row):
    text = record_text(record, opts, None, f"row {row}")
    yield text, len(text)


def wanted(relpath, patterns):
    """Does a file under an --input dir match --ext (extensions or globs, any case)?"""
    path = relpath.lower().replace(os.sep, "/")
    base = os.path.basename(path)
    stem = os.path.splitext(base)[0] if base.endswith(COMPRESSION) else base
    for p in patterns:
        if any(c in p for c in "*?["):
            if any(fnmatch.fnmatchcase(s, p) for s in (path, base, stem)):
                return True
        elif stem.endswith("." + p.lstrip(".")) or base.endswith("." + p.lstrip(".")):
            return True
    return False


def is_saved_dataset(path):
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_dict.json"))
        or all(os.path.exists(os.path.join(path, n)) for n in ("state.json", "dataset_info.json")))


def walk(root, patterns, out_dir):
    found = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for n in names:
            path = os.path.join(dirpath, n)
            ours = os.path.abspath(dirpath) == out_dir and (n in OUTPUTS or n.endswith((".partial", ".tmp")))
            if not ours and wanted(os.path.relpath(path, root), patterns):
                found.append(path)
    return sorted(found)


def glob_pattern(pattern):
    """A compiled regex for a glob of '/'-separated parts: '**' is any number of directories,
    '*' and '?' stay inside one name and, as in glob, match no leading dot."""
    parts, names = [], pattern.split("/")
    for k, part in enumerate(names):
        if part == "**":  # as the last part it names the files too
            parts.append("(?:[^/.][^/]*/)*" + ("[^/.][^/]*/" if k == len(names) - 1 else ""))
            continue
        rx = "" if part.startswith((".", "[")) or part.strip("*?") == part else "(?![.])"
        i = 0
        while i < len(part):
            c = part[i]
            end = part.find("]", i + 2) if c == "[" else -1
            if c == "*":
                rx += "[^/]*"
            elif c == "?":
                rx += "[^/]"
            elif end > 0:
                body = part[i + 1:end]
                rx += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
                i = end
            else:
                rx += re.escape(c)
            i += 1
        parts.append(rx + "/")
    return re.compile("".join(parts)[:-1] + r"\Z")


def glob_files(spec):
    """The files a glob names, sorted. glob.glob's '**' follows symlinked directories, so a
    symlink loop makes it recurse until paths grow too long (two loops: exponentially); here
    '**' walks like a directory input, without following directory links."""
    if "**" not in spec:
        return [p for p in sorted(glob.glob(spec)) if os.path.isfile(p)]
    parts = spec.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = "/".join(parts[:fixed]) or ("/" if spec.startswith("/") else ".")
    rx = glob_pattern("/".join(parts[fixed:]))
    found = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for n in names:
            path = os.path.join(dirpath, n)
            if rx.match(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/")) and os.path.isfile(path):
                found.append(os.path.normpath(path) if root != "." else os.path.relpath(path))
    return sorted(found)


def find_inputs(args):
    sources, seen = [], set()

    def add(path):
        # by the file itself: links, '..' and overlapping inputs never take a file twice
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            sources.append(FileSource(path))

    out_dir = os.path.abspath(args.out_dir)
    for spec in args.input:
        if spec.startswith("hf:") or is_saved_dataset(spec):
            sources.append(DatasetSource(spec, args.hf_split))
        elif os.path.isdir(spec):
            found = walk(spec, args.ext, out_dir)
            if not found:
                raise DataError(f"--input {spec}: no files matching --ext={','.join(args.ext)} found; "
                                f"set --ext (e.g. --ext=txt,md,py or --ext='*.log')")
            for path in found:
                add(path)
        elif os.path.isfile(spec):
            add(spec)
        elif any(c in spec for c in "*?["):
            files = glob_files(spec)
            if not files:
                raise DataError(f"--input {spec}: no file matches this glob")
            for path in files:
                add(path)
        else:
            raise DataError(f"--input {spec}: no such file or directory")
    return sources


# ----------------------------------------------------------------------------------------
# reading formats: text, JSON lines, JSON arrays


def file_blocks(f, chunk_bytes):
    """The stream's bytes in blocks that each end after a newline (or, inside a line longer
    than chunk_bytes, at a character boundary), so every block decodes on its own."""
    carry = b""
    while block := f.read(chunk_bytes):
        data = carry + block
        cut = data.rfind(b"\n") + 1 or _last_char_start(data)
        if cut:
            yield data[:cut]
        carry = data[cut:]
    if carry:
        yield carry


def _last_char_start(data, lo=0):
    # UTF-8 continuation bytes look like 0b10xxxxxx; the last character may be incomplete
    i = len(data) - 1
    while i > lo and data[i] & 0xC0 == 0x80:
        i -= 1
    return i


def text_pieces(f, opts):
    offset = 0
    for raw in file_blocks(f, opts.chunk_bytes):
        yield decode(raw, offset, opts.replace), len(raw)
        offset += len(raw)


def jsonl_records(f, opts, skip):
    offset, lineno, rec = 0, 0, -1
    while line := f.readline(opts.chunk_bytes):
        lineno += 1
        if len(line) == opts.chunk_bytes and not line.endswith(b"\n"):
            rec += 1  # a record larger than a chunk: parsed as it is read
            big = StreamedRecord(f, line, offset, lineno, opts)
            if rec not in skip:
                yield rec, big.pieces()
            offset += big.finish()
            continue
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        rec += 1
        if rec not in skip:
            yield rec, _line_pieces(line, start, lineno, opts)


def _line_pieces(line, offset, lineno, opts):
    s = decode(line, offset, opts.replace, lineno)
    try:
        record = json.loads(s)
    except ValueError as e:
        raise BadRecord(f"not valid JSON ({e.msg})", offset + len(s[:e.pos].encode("utf-8", "surrogatepass")), lineno)
    yield record_text(record, opts, offset, lineno), len(line)


def json_records(f, opts, skip):
    """The elements of a top-level JSON array (or one top-level object), one at a time:
    only an element, never the whole file, is held in memory."""
    def texts():
        offset = 0
        for raw in file_blocks(f, opts.chunk_bytes):
            yield decode(raw, offset, opts.replace)
            offset += len(raw)

    blocks, decoder, ws = texts(), json.JSONDecoder(), re.compile(r"[ \t\r\n]*")
    buf, pos, base, rec = "", 0, 0, -1  # base: the file offset of buf[0]

    def more(grow=False):
        """Read another block (grow: until the unparsed text doubles); False at the end."""
        nonlocal buf, pos, base
        want = 2 * (len(buf) - pos) if grow else 0
        base += len(buf[:pos].encode("utf-8", "surrogatepass"))
        buf, pos, read = buf[pos:], 0, False
        while (block := next(blocks, None)) is not None:
            buf, read = buf + block, True
            if len(buf) >= want:
                break
        return read

    def peek():
        nonlocal pos
        while True:
            pos = ws.match(buf, pos).end()
            if pos < len(buf) or not more():
                return buf[pos:pos + 1]

    def bad(msg, at):
        return BadRecord(msg, base + len(buf[:at].encode("utf-8", "surrogatepass")))

    def value():
        nonlocal pos
        peek()  # raw_decode takes no leading whitespace
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                # an element cut by the end of the buffer fails near its end (or, for a
                # string, says "Unterminated"); anything else is malformed
                truncated = e.pos >= len(buf) - 16 or e.msg.startswith("Unterminated")
                if truncated and more(grow=True):
                    continue
                raise bad(f"not valid JSON ({e.msg})", e.pos)
            if end == len(buf) and more(grow=True):
                continue  # a number or literal may go on in the next block
            start, pos = pos, end
            return obj, base + len(buf[:start].encode("utf-8", "surrogatepass")), end - start

    if peek() != "[":
        obj, offset, n = value()
        if peek():
            raise bad("more than one JSON value; name a file of one object per line .jsonl", pos)
        if 0 not in skip:
            yield 0, _element_pieces(obj, n, opts, 0, offset)
        return
    pos += 1
    if peek() == "]":
        pos += 1
    else:
        while True:
            obj, offset, n = value()
            rec += 1
            if rec not in skip:
                yield rec, _element_pieces(obj, n, opts, rec, offset)
            c = peek()
            pos += 1
            if c == "]":
                break
            if c != ",":
                raise bad("not valid JSON (expected , or ] after an array element)", pos - 1)
    if peek():
        raise bad("not valid JSON (data after the top-level array)", pos)


def _element_pieces(obj, nbytes, opts, rec, offset=None):
    yield record_text(obj, opts, offset, f"element {rec}"), nbytes


class StreamedRecord:
    """A JSON-lines record too large for one chunk, parsed as it is read: its text field comes
    out in pieces of about a chunk, everything else is skipped, and memory stays at a few
    chunks however large the record. Reads stop at the record's newline."""
    SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
    END = re.compile(rb"[,\]} \t\r\n]")  # what can follow a number or literal
    WS = re.compile(rb"[ \t\r]*")
    HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")

    def __init__(self, f, head, offset, lineno, opts):
        self.f, self.buf, self.pos, self.base, self.start = f, head, 0, offset, offset
        self.lineno, self.opts, self.found = lineno, opts, False

    def _more(self):
        if self.buf.endswith(b"\n"):
            return False  # the line ends here: the next bytes are the next record
        data = self.f.readline(self.opts.chunk_bytes)
        if not data:
            return False
        self.base += self.pos
        self.buf, self.pos = self.buf[self.pos:] + data, 0
        return True

    def _bad(self, reason):
        return BadRecord(reason, self.base + self.pos, self.lineno)

    def _peek(self):
        while True:
            self.pos = self.WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos:self.pos + 1]

    def _expect(self, c):
        if self._peek() != c:
            raise self._bad(f"not valid JSON (expected {c.decode()!r})")
        self.pos += 1

    def pieces(self):
        if self._peek() != b"{":
            raise self._bad("not valid JSON (expected an object)")
        yield from self._value(self.opts.path)
        if self._peek() not in (b"\n", b""):
            raise self._bad("not valid JSON (data after the record)")
        if not self.found:
            raise BadRecord(f"no string field {self.opts.text_field!r}; set --text_field", self.start,
                            self.lineno)

    def finish(self):
        """Skip to the end of the record's line; returns the bytes the whole line took."""
        self.pos = len(self.buf)
        while self._more():
            self.pos = len(self.buf)
        return self.base + len(self.buf) - self.start

    def _value(self, path):
        """Parse one value; path [] means it is the text field (streamed), None skips it."""
        c = self._peek()
        if c == b"{":
            self.pos += 1
            if self._peek() == b"}":
                self.pos += 1
            else:
                while True:
                    key = "".join(t for t, _ in self._string())
                    self._expect(b":")
                    yield from self._value(path[1:] if path and key == path[0] else None)
                    self._expect_any(b",}")
                    if self.buf[self.pos - 1:self.pos] == b"}":
                        break
        elif c == b"[":
            self.pos += 1
            if self._peek() == b"]":
                self.pos += 1
            else:
                while True:
                    yield from self._value(None)
                    self._expect_any(b",]")
                    if self.buf[self.pos - 1:self.pos] == b"]":
                        break
        elif c == b'"':
            if path == [] and not self.found:
                self.found = True
                yield from self._string(text=True)
            else:
                for _ in self._string(decode_text=False):
                    pass
        else:
            self._scalar()
        if path == [] and c != b'"':
            raise self._bad(f"field {self.opts.text_field!r} is not a string")

    def _expect_any(self, chars):
        c = self._peek()
        if not c or c not in chars:
            raise self._bad(f"not valid JSON (expected one of {chars.decode()!r})")
        self.pos += 1

    def _scalar(self):
        while not self.END.search(self.buf, self.pos) and self._more():
            pass  # the buffer may end inside it
        m = self.SCALAR.match(self.buf, self.pos)
        if m is None:
            raise self._bad("not valid JSON")
        self.pos = m.end()

    def _string(self, decode_text=True, text=False):
        """At an opening quote: the string's text in pieces of (text, nbytes); text: it is
        the text field, checked for lone surrogates."""
        if self._peek() != b'"':
            raise self._bad("not valid JSON (expected a string)")
        self.pos += 1
        while True:
            end = self._closing_quote()
            cut = end if end >= 0 else self._safe_cut()
            if cut > self.pos:
                raw, at = self.buf[self.pos:cut], self.base + self.pos
                self.pos = cut
                piece = self._decode(raw, at, text)  # skipped strings are checked too
                yield (piece if decode_text else ""), len(raw)
            if end >= 0:
                self.pos = end + 1
                return
            if not self._more():
                raise self._bad("the record ends inside a string")

    def _closing_quote(self):
        i = self.pos
        while (i := self.buf.find(b'"', i)) >= 0:
            j = i
            while j > self.pos and self.buf[j - 1] == 0x5C:  # backslashes before it
                j -= 1
            if (i - j) % 2 == 0:
                return i
            i += 1
        return -1

    def _safe_cut(self):
        """Where the buffered part of a string can be cut: not inside an escape (nor between
        the two halves of a surrogate pair), nor inside a UTF-8 character."""
        cut = len(self.buf)
        k = self.buf.find(b"\\", max(self.pos, cut - 12))
        if k >= 0:
            while k > self.pos and self.buf[k - 1] == 0x5C:
                k -= 1
            cut = k
            if cut - 6 >= self.pos and self.HIGH_SURROGATE.fullmatch(self.buf, cut - 6, cut):
                cut -= 6
        elif cut > self.pos and self.buf[cut - 1] & 0x80:
            i = _last_char_start(self.buf, self.pos)
            lead = self.buf[i]
            need = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            if i + need > cut:
                cut = i
        return cut

    def _decode(self, raw, offset, check):
        text = decode(raw, offset, self.opts.replace, self.lineno)
        try:
            text = json.loads('"' + text + '"')
        except ValueError as e:
            raise BadRecord(f"not valid JSON ({e.msg})", offset + max(e.pos - 1, 0), self.lineno)
        return fix_surrogates(text, self.opts.replace, offset, self.lineno) if check else text


# ----------------------------------------------------------------------------------------
# the scan: every input read once, documents counted, bad ones found


def scan_inputs(sources, opts):
    """{'docs': [documents per input], 'bad': {input: [records] or 'all'}, 'bytes': total,
    'chars': the characters of the last document, ...}; bad documents are errors (listed all at
    once) unless --errors=skip."""
    scan = {"docs": [], "bad": {}, "bytes": 0, "chars": 0, "empty": 0, "skipped": 0}
    problems, REPLACED[0] = [], 0
    with progress("reading inputs", sum(s.size for s in sources)) as bar:
        base = 0  # bytes of the inputs before this one
        for i, src in enumerate(sources):
            docs, nbytes, chars, bad, first = 0, 0, 0, [], None
            try:
                for rec, pieces in src.records(opts, ()):
                    try:
                        n, c = _consume(pieces, lambda: bar.update(max(0, base + src.position() - bar.n)))
                    except BadRecord as e:
                        if isinstance(e, Unreadable):
                            raise  # not this document alone: the whole file
                        bad.append(rec)
                        first = first or e
                        continue
                    if c == 0:
                        scan["empty"] += 1
                    else:
                        docs, nbytes, chars = docs + 1, nbytes + n, c
            except BadRecord as e:  # the rest of the file cannot be read: none of it is used
                docs, bad, first = 0, "all", e if isinstance(e, Unreadable) else first or e
            if docs:
                scan["bytes"], scan["chars"] = scan["bytes"] + nbytes, chars
            base += src.size
            bar.update(max(0, base - bar.n))
            scan["docs"].append(docs)
            if first:
                scan["bad"][str(i)] = bad
                problems.append((src, first, bad))
    scan["replaced"] = REPLACED[0]
    report_problems(problems, opts, scan)
    if sum(scan["docs"]) == 0:
        raise DataError(f"--input {' '.join(opts.input)}: no documents with text found")
    return scan


def _consume(pieces, tick):
    nbytes = chars = 0
    for text, n in pieces:
        if text:
            nbytes, chars = nbytes + n, chars + len(text)
        tick()
        check_interrupted()
    return nbytes, chars


def report_problems(problems, opts, scan):
    lines = []
    for src, first, bad in problems:
        more = (" (the rest of the file cannot be read, so none of it is used)" if bad == "all" else
                f" (and {len(bad) - 1:,} more bad document(s) in it)" if len(bad) > 1 else "")
        lines.append(first.describe(src.name) + more)
    if problems and not opts.skip:
        if len(lines) == 1:
            raise DataError(f"{lines[0]}; fix it, or pass --errors=skip to leave bad documents out"
                            f"{'' if opts.replace else ' or --errors=replace to put U+FFFD in place of bad text'}")
        raise DataError(f"{len(lines)} inputs have bad documents (--errors=skip leaves them out"
                        f"{'' if opts.replace else ', --errors=replace puts U+FFFD in place of bad text'}):\n  "
                        + "\n  ".join(lines))
    for line in lines:
        print(f"skipped: {line}", file=sys.stderr)
    scan["skipped"] = sum(len(b) if b != "all" else 1 for _, _, b in problems)
    if scan["replaced"]:
        print(f"replaced {scan['replaced']:,} undecodable byte sequence(s) or lone surrogate(s) "
              f"with U+FFFD", file=sys.stderr)
