"""
Prepare any text corpus for training:

    python data/text/prepare.py --input=PATH [PATH ...] --encoding=gpt2 --out_dir=data/mytext

--input        files, directories, globs, local Hugging Face datasets (a save_to_disk dir) or
               hf:NAME[:CONFIG] (a dataset on the hub, downloaded into the HF cache)
--ext          what a directory contributes (searched recursively, hidden dirs skipped, in
               sorted order): extensions and/or globs, case-insensitive, comma-separated
               (default txt,jsonl; e.g. --ext=py,md or --ext='test_*.py'). A file named
               on the command line is taken whatever its name.
--encoding     char | gpt2 | cl100k_base | any tiktoken encoding | bpe:N (train a byte-level
               BPE with N tokens on the train split, saved as <out_dir>/tokenizer.json) |
               hf:DIR (the tokenizer.json of the Hugging Face model in DIR) | char:DIR (the
               characters of a char data dir, or of the dir export.py wrote for a char-level
               checkpoint)
--val_fraction share of the documents that go to val.bin (default 0.1)
--seed         which documents go to val (default 1337)
--text_field   the field holding the text in JSON records, parquet rows and HF datasets;
               a.b is record["a"]["b"] (default text)
--errors       strict | skip | replace: what to do with text that is not valid UTF-8 or holds
               lone surrogates ("\\ud800" in JSON), and with malformed records (default strict)
--hf_split     the split of a Hugging Face dataset (default train)
--num_proc     encoder processes (default: min(8, CPUs))
--resume       keep the progress of an interrupted run and continue it (run the same command
               again); without it an interrupted run removes what it wrote
--out_dir      where train.bin, val.bin and meta.json go (default: this script's dir)

Formats, by file name (case-insensitive), each optionally compressed (.gz, .xz, .bz2, .zst):
  .jsonl/.ndjson one JSON object per line; .json an array of objects (or of strings);
  .parquet rows; anything else is plain UTF-8 text.
Documents: each text file is one document, and so is each JSON record, parquet row or dataset
row. Empty documents are skipped. With tiktoken and bpe encodings every document is followed by
the end-of-text token; with char a newline is added after a document that does not already end
in one. So decoding train.bin gives back the train documents in input order joined by that
rule, exactly, and val.bin the val documents.

Val split: a seeded random val_fraction of the documents (at least one), whole; which ones
depends only on (seed, number of documents). A single document is cut like nanoGPT's: its
first (1 - val_fraction) of characters go to train, the rest to val.

--errors: strict stops before writing anything and lists every input with a bad document and
the byte offset in that file (in the decompressed data for compressed files); skip leaves the
bad documents out and says which; replace puts U+FFFD in place of each undecodable byte
sequence and lone surrogate and counts them (malformed records are still errors).

Memory stays bounded whatever the input size: files are read a few MB at a time, cut at line
ends (a line longer than that is cut at a character boundary, which for tiktoken/bpe may
tokenize the cut differently but still decodes to the same text); a JSON line longer than that
is parsed as it is read and its text streamed. The passes: one that reads every input (counting
documents, finding bad ones), for char one that collects the characters and for bpe one that
trains it, then the encoding pass through a pool of processes. meta.json records the inputs
(path, size, mtime), the document counts and the options. The readers are corpus.py's.
"""
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import install_error_hook  # noqa: E402
from gpt_trainer.corpus import BadRecord, find_inputs, scan_inputs  # noqa: E402
from gpt_trainer.dataprep import (PROGRESS, ResumeState, check_prepare_arguments, check_writable,  # noqa: E402
                                  collect_chars, discard_partials, fit_bpe, group_chunks, interruptible,
                                  lock_data_dir, partial_path, prepare_arguments, write_stream)
from gpt_trainer.dirlock import is_locked, unlock_dir  # noqa: E402
from gpt_trainer.errors import DataError  # noqa: E402
from gpt_trainer.tokenizer import BPETokenizer, CharTokenizer, get_tokenizer  # noqa: E402

CHUNK_BYTES = 4 << 20  # text per encoder task: big enough to amortize IPC, small to bound RAM
# ----------------------------------------------------------------------------------------
# splitting documents into train and val


def _mix(x):
    # splitmix64's finalizer: a fixed hash of uint64s (numpy's generators may change between
    # versions; this never does, so the split is reproducible from meta.json)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def val_documents(num_docs, val_fraction, seed):
    """A boolean mask of the documents that go to val: the k = round(N * val_fraction) (at
    least 1, at most N - 1) with the smallest hash of (seed, index)."""
    k = min(num_docs - 1, max(1, round(num_docs * val_fraction)))
    offset = np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
    with np.errstate(over="ignore"):
        keys = _mix(np.arange(num_docs, dtype=np.uint64) + offset)
    mask = np.zeros(num_docs, dtype=bool)
    mask[np.argpartition(keys, k - 1)[:k]] = True
    return mask


def corpus_segments(sources, opts, scan, val_mask, cut):
    """(split, text, ends_doc, nbytes) for every usable document in input order; val_mask
    picks whole documents, or for a single document cut is where val starts (a character)."""
    doc = 0
    for i, src in enumerate(sources):
        bad = scan["bad"].get(str(i), [])
        if bad == "all":
            continue
        try:
            for _, pieces in src.records(opts, set(bad)):
                texts = ((t, n) for t, n in pieces if t)
                first = next(texts, None)
                if first is None:
                    continue
                if cut is not None:
                    yield from cut_document(first, texts, cut)
                    continue
                split = "val" if val_mask[doc] else "train"
                doc += 1
                for (text, n), ends in _with_last(first, texts):
                    yield split, text, ends, n
        except BadRecord as e:
            raise DataError(f"{e.describe(src.name)}; the input changed while it was prepared, "
                            f"run again")


def _with_last(first, rest):
    prev = first
    for item in rest:
        yield prev, False
        prev = item
    yield prev, True


def cut_document(first, rest, cut):
    """A single document: its first `cut` characters to train, the rest to val."""
    pos, parts = 0, []
    for (text, n), ends in _with_last(first, rest):
        if pos < cut < pos + len(text):
            parts = [("train", text[:cut - pos], n), ("val", text[cut - pos:], 0)]
        else:
            parts = [("train" if pos < cut else "val", text, n)]
        pos += len(text)
        for j, (split, t, k) in enumerate(parts):
            yield split, t, ends and j == len(parts) - 1, k


# ----------------------------------------------------------------------------------------
# the tokenizer and the whole run


def make_tokenizer(args, segments, scan, resume):
    state = resume.state if resume else {}
    total = scan["bytes"]
    if args.encoding == "char":
        if "chars" not in state:
            tok = collect_chars(group_chunks(segments(), args.chunk_bytes), args.num_proc, total)
            state["chars"] = tok.chars
            if resume:
                resume.save(chars=tok.chars)
        return CharTokenizer(state["chars"])
    if args.encoding.startswith("bpe:"):
        path = partial_path(args.out_dir, "tokenizer.json")
        if state.get("tokenizer") and os.path.exists(path):
            tok = BPETokenizer(path)
            if tok.fingerprint() == state["tokenizer"]:
                return tok
        texts = ((t if split == "train" else None, n) for split, t, _, n in segments())
        tok = fit_bpe(texts, args.bpe_vocab, path, total)
        if resume:
            resume.save(tokenizer=tok.fingerprint())
        return tok
    if args.encoding.startswith("hf:"):  # the data dir keeps its own copy of the model's tokenizer.json
        tok = args.tiktoken
        shutil.copyfile(tok.path, partial_path(args.out_dir, "tokenizer.json"))
        tok.path = "tokenizer.json"
        return tok
    return args.tiktoken


def options(args):
    return {"encoding": args.encoding, "val_fraction": args.val_fraction, "seed": args.seed,
            "text_field": args.text_field, "errors": args.errors, "ext": args.ext,
            "hf_split": args.hf_split}


def source_meta(sources, scan, val_mask, cut, args):
    """What meta.json records about where the data came from."""
    inputs = [{**s.identity(), "documents": n} for s, n in zip(sources, scan["docs"])]
    for i, bad in scan["bad"].items():
        inputs[int(i)]["skipped"] = bad if bad == "all" else len(bad)
    num_val = int(val_mask.sum()) if val_mask is not None else 0
    split = ({"by": "documents", "val_documents": num_val} if cut is None else
             {"by": "characters", "train_characters": cut, "characters": scan["chars"]})
    return {"inputs": inputs, "options": options(args), "split": split,
            "documents": {"train": sum(scan["docs"]) - num_val, "val": num_val,
                          "skipped": scan["skipped"], "empty": scan["empty"]},
            "replaced": scan["replaced"]}


def prepare(args):
    sources = find_inputs(args)
    resume = None
    if args.resume:
        resume = ResumeState(args.out_dir, {"inputs": [s.identity() for s in sources],
                                            "options": options(args), "chunk_bytes": args.chunk_bytes})
    elif os.path.exists(os.path.join(args.out_dir, PROGRESS)):
        raise DataError(f"{args.out_dir} holds the progress of an interrupted prepare "
                        f"({PROGRESS}); pass --resume to continue it, or delete that file to "
                        f"start over")
    scan = (resume.state.get("scan") if resume else None) or scan_inputs(sources, args)
    lock_data_dir(args.out_dir)  # creates it: the scan found nothing wrong
    if resume and "scan" not in resume.state:
        resume.save(scan=scan)
    num_docs = sum(scan["docs"])
    val_mask = val_documents(num_docs, args.val_fraction, args.seed) if num_docs > 1 else None
    cut = int(scan["chars"] * (1 - args.val_fraction)) if num_docs == 1 else None

    def segments():
        return corpus_segments(sources, args, scan, val_mask, cut)

    try:
        tok = make_tokenizer(args, segments, scan, resume)
        write_stream(args.out_dir, tok, group_chunks(segments(), args.chunk_bytes), args.num_proc,
                     scan["bytes"], {"source": source_meta(sources, scan, val_mask, cut, args)}, resume)
    except BaseException:
        if not resume:  # e.g. a new tokenizer.json.partial, or a file a kill cut short
            discard_partials(args.out_dir, ["tokenizer.json", "train.bin", "val.bin"])
        raise


def parse_args(argv=None):
    p = prepare_arguments(__doc__, "txt,jsonl", os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--text_field", default="text")
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--resume", action="store_true")
    args = check_prepare_arguments(p.parse_args(argv), "files")
    if args.num_proc < 1:
        raise DataError(f"--num_proc={args.num_proc} must be at least 1")
    if not args.encoding.startswith("bpe:") and args.encoding != "char":
        args.tiktoken = get_tokenizer(args.encoding)
    args.path = args.text_field.split(".")
    args.chunk_bytes = CHUNK_BYTES
    return args


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.out_dir)  # before the inputs are read, which may take long
    outcome = ("its progress is kept: run the same command again to continue" if args.resume
               else f"{args.out_dir} is unchanged")
    held = is_locked(args.out_dir)
    try:
        with interruptible(outcome):
            if os.path.isdir(args.out_dir):
                lock_data_dir(args.out_dir)  # before anything in it is read; a new one after the scan
            prepare(args)
    finally:
        if not held:  # released for a caller in this process (the CLI's ends with the process)
            unlock_dir(args.out_dir)


if __name__ == "__main__":
    install_error_hook()
    main()
