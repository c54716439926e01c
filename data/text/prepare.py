"""
Prepare any text corpus for training:

    python data/text/prepare.py --input=PATH [PATH ...] --encoding=gpt2 --out_dir=data/mytext

--input        .txt files, .jsonl files (one JSON object per line, text under --text_field),
               or directories, searched recursively for .txt and .jsonl in sorted order
--encoding     char | gpt2 | cl100k_base | any tiktoken encoding | bpe:N (train a byte-level
               BPE with N tokens on the train split, saved as <out_dir>/tokenizer.json)
--val_fraction share of the input that goes to val.bin (default 0.1)
--num_proc     encoder processes (default: min(8, CPUs))
--out_dir      where train.bin, val.bin and meta.json go (default: this script's dir)

Documents: each .txt file is one document, and so is each .jsonl record. Empty documents are
skipped. With tiktoken and bpe encodings every document is followed by the end-of-text token;
with char a newline is added after a document that does not already end in one. So decoding
train.bin and then val.bin gives back the documents joined by that rule, exactly.

Val split: the inputs are taken as one byte stream in the order above (S = total bytes), and
val holds everything from the line (of a .txt) or record (of a .jsonl) that contains byte
(1 - val_fraction) * S onwards: the last ~val_fraction of the corpus, cut at a line start.

Memory stays bounded whatever the input size: files are read a few MB at a time, cut at line
ends (a line longer than that is cut at a character boundary, which for tiktoken/bpe may
tokenize the cut differently but still decodes to the same text), encoded by a pool of
processes and appended to the output files. char needs its vocabulary up front, so it makes
one extra pass to collect the characters; bpe makes one extra pass to train.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from dataloader import DataError  # noqa: E402
from tokenizer import (CharTokenizer, Progress, get_tokenizer, group_chunks,  # noqa: E402
                       imap_bounded, run_cli, train_bpe, write_stream)

CHUNK_BYTES = 4 << 20  # text per encoder task: big enough to amortize IPC, small to bound RAM


def find_inputs(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                     if n.endswith((".txt", ".jsonl"))]
            files += sorted(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"--input {path}: no such file or directory")
    if not files:
        raise DataError(f"--input {' '.join(paths)}: no .txt or .jsonl files found")
    return files


def file_blocks(path, chunk_bytes):
    """The file's bytes in blocks that each end after a newline (or, inside a line longer
    than chunk_bytes, at a character boundary), so every block decodes on its own."""
    with open(path, "rb") as f:
        carry = b""
        while block := f.read(chunk_bytes):
            data = carry + block
            cut = data.rfind(b"\n") + 1 or _last_char_start(data)
            if cut:
                yield data[:cut]
            carry = data[cut:]
        if carry:
            yield carry


def _last_char_start(data):
    # UTF-8 continuation bytes look like 0b10xxxxxx; the last character may be incomplete
    i = len(data) - 1
    while i > 0 and data[i] & 0xC0 == 0x80:
        i -= 1
    return i


def _decode(raw, path, offset):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {offset + e.start}; convert the "
                        f"file to UTF-8")


def txt_segments(path, offset, val_start, chunk_bytes):
    """(split, text, ends_doc, nbytes) for one .txt document starting at stream byte offset."""
    blocks = file_blocks(path, chunk_bytes)
    block = next(blocks, None)
    while block is not None:
        following = next(blocks, None)  # look ahead to know which piece ends the document
        parts = split_block(block, offset, val_start)
        for i, (split, raw) in enumerate(parts):
            ends_doc = following is None and i == len(parts) - 1
            yield split, _decode(raw, path, offset), ends_doc, len(raw)
            offset += len(raw)
        block = following


def split_block(block, offset, val_start):
    """[(split, bytes)]: train keeps the block's lines that end at or before val_start."""
    if offset + len(block) <= val_start:
        return [("train", block)]
    cut = block.rfind(b"\n", 0, max(val_start - offset, 0)) + 1
    return [(s, part) for s, part in (("train", block[:cut]), ("val", block[cut:])) if part]


def jsonl_segments(path, offset, val_start, text_field):
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            offset += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})")
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: no string field {text_field!r}; set "
                                f"--text_field to the field holding the text")
            if text:
                yield ("train" if offset <= val_start else "val"), text, True, len(line)


def corpus_segments(files, val_fraction, text_field, chunk_bytes=CHUNK_BYTES):
    total = sum(os.path.getsize(f) for f in files)
    val_start = int(total * (1 - val_fraction))
    offset = 0
    for path in files:
        if path.endswith(".jsonl"):
            yield from jsonl_segments(path, offset, val_start, text_field)
        else:
            yield from txt_segments(path, offset, val_start, chunk_bytes)
        offset += os.path.getsize(path)


def _chunk_chars(chunk):
    _, segments, nbytes = chunk
    chars = set()
    for text, ends_doc in segments:
        chars.update(text)
        if ends_doc and not text.endswith("\n"):
            chars.add("\n")  # the newline the char join rule adds
    return chars, nbytes


def scan_chars(chunks, num_proc, total):
    chars, progress = set(), Progress("collecting characters", total)
    for found, nbytes in imap_bounded(_chunk_chars, chunks, num_proc):
        chars |= found
        progress.update(nbytes)
    progress.close()
    return CharTokenizer(sorted(chars))


def fit_bpe(chunks, vocab_size, out_dir, total):
    progress = Progress(f"training bpe:{vocab_size}", total)

    def train_texts():
        for split, segments, nbytes in chunks:
            if split == "train":  # val stays unseen, as it would be for a real held-out set
                yield from (text for text, _ in segments)
            progress.update(nbytes)

    tok = train_bpe(train_texts(), vocab_size, os.path.join(out_dir, "tokenizer.json"))
    progress.close()
    return tok


def make_tokenizer(encoding, chunks, args, total):
    if encoding == "char":
        return scan_chars(chunks(), args.num_proc, total)
    if encoding.startswith("bpe:"):
        try:
            vocab_size = int(encoding[4:])
        except ValueError:
            raise DataError(f"--encoding={encoding}: expected bpe:N with N an integer")
        return fit_bpe(chunks(), vocab_size, args.out_dir, total)
    return get_tokenizer(encoding)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 1, like every other bad input
        raise DataError(message)


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)  # --input=a b c
    p.add_argument("--input", nargs="+", action="extend", default=[])
    p.add_argument("--encoding", default="gpt2")
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--text_field", default="text")
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args(argv)
    args.input += args.paths
    if not args.input:
        raise DataError("no input: pass --input=PATH (a .txt/.jsonl file or a directory)")
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val_fraction={args.val_fraction} must be between 0 and 1")
    if args.num_proc < 1:
        raise DataError(f"--num_proc={args.num_proc} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    files = find_inputs(args.input)
    total = sum(os.path.getsize(f) for f in files)
    os.makedirs(args.out_dir, exist_ok=True)

    def chunks():
        segments = corpus_segments(files, args.val_fraction, args.text_field)
        return group_chunks(segments, CHUNK_BYTES)

    tok = make_tokenizer(args.encoding, chunks, args, total)
    write_stream(args.out_dir, tok, chunks(), args.num_proc, total)


if __name__ == "__main__":
    run_cli(main)
