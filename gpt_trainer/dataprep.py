"""
Writing prepared datasets: the one implementation every data/*/prepare.py uses.

A data dir changes all at once. Its files (tokenizer.json, train.bin, val.bin) are written
under <name>.partial, fsynced, and renamed into place together with meta.json last; meta.json
records the token counts and the tokenizer's fingerprint, so a reader can tell if the files
beside it are not the ones it was written with (dataloader.open_dataset refuses them). A
failed or interrupted prepare removes its .partial files and leaves the old dir as it was,
unless it was asked to keep its progress for a resume (ResumeState).

Long corpora stream through a pool of encoder processes (imap_bounded keeps at most a few
chunks in flight, so memory stays flat), with tqdm progress on stderr for every phase that
takes more than a second: redrawn in place on a terminal, a line at a time in a log file
(every second at first, then less often).
"""
import argparse
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

from configurator import ArgumentParser
from gpt_trainer.dataloader import dtype_for_vocab
from gpt_trainer.dirlock import holding, lock_dir
from gpt_trainer.errors import DataError
from gpt_trainer.fsutil import download, fsync_dir, write_failure, write_json
from gpt_trainer.tokenizer import CharTokenizer, tokenizer_from_meta, train_bpe

META = "meta.json"
PROGRESS = "prepare.progress.json"  # a --resume run's record of what is already done

# ----------------------------------------------------------------------------------------
# progress


class _LogLines:
    """tqdm's output for a file that is not a terminal: each redraw as its own line, at most
    one a second at first and then one per ~1/30 of the time elapsed, so a long phase logs
    a few dozen lines rather than thousands."""

    def __init__(self, stream):
        self.stream, self.bar = stream, None

    def write(self, s):
        line = s.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
            if self.bar is not None:
                self.bar.mininterval = max(1.0, (time.time() - self.bar.start_t) / 30)

    def flush(self):
        self.stream.flush()


def progress(desc, total, unit="B", initial=0, **kwargs):
    """A tqdm bar on stderr; unit 'B' counts bytes (shown as kB, MB, ...)."""
    tty = sys.stderr.isatty()
    out = sys.stderr if tty else _LogLines(sys.stderr)
    options = dict(unit_scale=unit == "B", unit_divisor=1000, file=out, dynamic_ncols=tty,
                   mininterval=0.2 if tty else 1.0, delay=0.5 if tty else 1.0, ascii=not tty,
                   smoothing=0.1)
    bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, **{**options, **kwargs})
    if not tty:
        out.bar = bar
    return bar


tqdm.monitor_interval = 0  # no monitor thread: bars here are updated from one thread


# ----------------------------------------------------------------------------------------
# interruption: Ctrl-C and SIGTERM end a prepare with one line, its temp files removed


SIGNALS = (signal.SIGINT, signal.SIGTERM)
_interrupted = None  # the signal that interrupted this process, once one has
_deferred = False  # while True, an interruption is recorded and raised later


@contextlib.contextmanager
def interruptible(outcome):
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main process, so every `finally` and
    `with` below runs (encoder pools are terminated, .partial files removed); the
    interruption then ends as one `error: interrupted ...; <outcome>` line and status 1."""
    global _interrupted

    def handler(signum, frame):
        global _interrupted
        if _interrupted is None:  # a second signal does not interrupt the clean-up
            _interrupted = signal.Signals(signum).name
            if not _deferred:
                raise KeyboardInterrupt(_interrupted)

    _interrupted = None
    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    except KeyboardInterrupt as e:
        raise DataError(f"interrupted ({e or 'SIGINT'}); {outcome}") from None
    except OSError as e:  # a full disk, a read-only mount, a file where a directory should be
        where = f"{e.filename}: " if e.filename else ""
        raise DataError(f"{where}{write_failure(e)}; {outcome}") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _interrupted = None


def check_interrupted():
    """Raise an interruption that was deferred, or swallowed where it landed (an exception in
    a finalizer or an at-fork hook is printed and ignored)."""
    if _interrupted is not None:
        raise KeyboardInterrupt(_interrupted)


def _worker_signals():
    # Ctrl-C reaches the whole process group: the parent handles it and terminates the pool.
    # SIGTERM (from imap_bounded's clean-up) ends a worker at once, silently: no traceback, no
    # half-sent result, however the parent's handlers (and blocked signals) were inherited.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


# ----------------------------------------------------------------------------------------
# files of a data dir: written as .partial, committed together


def prepare_arguments(description, ext, out_dir):
    """The options data/text/prepare.py and data/chat/prepare.py share: inputs (as --input=a b c
    or positional), extensions, encoding, out_dir, the val split, seed, errors, hf_split.
    argparse, not configurator's settings: inputs are many paths, and there are flags."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)  # --input=a b c
    p.add_argument("--input", nargs="+", action="extend", default=[])
    p.add_argument("--ext", default=ext)
    p.add_argument("--encoding", default="gpt2")
    p.add_argument("--out_dir", default=out_dir)
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--errors", choices=("strict", "skip", "replace"), default="strict")
    p.add_argument("--hf_split", default="train")
    return p


def check_prepare_arguments(args, inputs):
    """What prepare_arguments' options must hold, checked before any input is read (one
    DataError line each); sets input, ext (a list), bpe_vocab for bpe:N, replace and skip."""
    args.input += args.paths
    if not args.input:
        raise DataError(f"no input: pass --input=PATH ({inputs}, directories or a dataset)")
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val_fraction={args.val_fraction} must be between 0 and 1")
    if args.encoding.startswith("bpe:"):
        try:
            args.bpe_vocab = int(args.encoding[4:])
        except ValueError:
            raise DataError(f"--encoding={args.encoding}: expected bpe:N with N an integer")
        if args.bpe_vocab < 257:
            raise DataError(f"--encoding={args.encoding}: too small, it needs 256 byte tokens "
                            f"plus <|endoftext|>; use bpe:N with N >= 257")
    args.ext = [e.strip().lower() for e in re.split(r"[,\s]+", args.ext) if e.strip()]
    args.replace, args.skip = args.errors == "replace", args.errors == "skip"
    return args


def lock_data_dir(out_dir):
    """One prepare at a time per data dir (created if missing): a second one stops at once,
    naming the first (dirlock; the lock dies with its process, kill -9 included)."""
    return lock_dir(out_dir, DataError, "out_dir", "prepare")


def data_dir_held(out_dir):
    """lock_data_dir for a with block (released at its end unless held before)."""
    return holding(out_dir, DataError, "out_dir", "prepare")


def check_writable(out_dir):
    """Before a long read of the inputs: out_dir, or the directory it would be created in, must
    be a writable directory."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"out_dir={out_dir} is a file, not a directory; pick another --out_dir")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a directory" if not os.path.isdir(parent) else "is not writable"
        raise DataError(f"cannot create out_dir={out_dir}: {parent} {why}; pick another --out_dir")


def partial_path(out_dir, name):
    return os.path.join(out_dir, name + ".partial")


class TokenWriter:
    """Appends ids to <path>.partial; commit_data_dir() renames it to <path> later, so an
    interrupted run never leaves a complete-looking train.bin. resume_tokens > 0 continues a
    .partial file from that many tokens (anything after them, e.g. a torn write, is cut off)."""

    def __init__(self, path, dtype, resume_tokens=0):
        self.path, self.dtype, self.partial = path, np.dtype(dtype), path + ".partial"
        self.num_tokens = resume_tokens
        if resume_tokens:
            self.f = open(self.partial, "r+b")
            self.f.truncate(resume_tokens * self.dtype.itemsize)
            self.f.seek(0, os.SEEK_END)
        else:
            self.f = open(self.partial, "wb")

    def write(self, ids):
        ids = np.asarray(ids, dtype=self.dtype)
        self.f.write(ids.tobytes())
        self.num_tokens += len(ids)

    def sync(self):
        """Make everything written so far durable (before recording it as done)."""
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        """Stop, keeping the .partial file (for a resume, or for commit_data_dir)."""
        if not self.f.closed:
            self.sync()
            self.f.close()

    def abort(self):
        with contextlib.suppress(OSError):  # a full disk fails the flush too
            self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.partial)


def discard_partials(out_dir, names):
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial_path(out_dir, name))


def commit_data_dir(out_dir, names, meta):
    """Rename each <name>.partial to <name> (fsynced first), then write meta.json last: a
    crash in between leaves a meta.json whose token counts or tokenizer fingerprint do not
    match the new files, which open_dataset refuses. A tokenizer file the new meta does not
    use (a bpe dir re-prepared as gpt2) is removed."""
    for name in names:
        with open(partial_path(out_dir, name), "rb+") as f:
            os.fsync(f.fileno())
    for name in names:
        os.replace(partial_path(out_dir, name), os.path.join(out_dir, name))
    write_json(os.path.join(out_dir, META), meta)
    if "tokenizer_file" not in meta and os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        os.remove(os.path.join(out_dir, "tokenizer.json"))
    fsync_dir(out_dir)


def dataset_meta(tok, counts, **extra):
    return {**tok.meta(), "vocab_size": tok.vocab_size,
            "dtype": dtype_for_vocab(tok.vocab_size).name,
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "tokenizer_fingerprint": tok.fingerprint(), **extra}


def report(out_dir, meta):
    print(f"{out_dir}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens, "
          f"vocab {meta['vocab_size']:,} ({meta['encoding']}, {meta['dtype']})")


def token_files(tok):
    """The files a dataset of tok commits: its tokenizer file if it has one, and the bins."""
    file = tok.meta().get("tokenizer_file")
    return ([file] if file else []) + ["train.bin", "val.bin"]


def write_dataset(out_dir, tok, splits, **extra):
    """Small in-memory datasets: splits = {'train': ids, 'val': ids}."""
    with data_dir_held(out_dir):
        return _write_dataset(out_dir, tok, splits, **extra)


def _write_dataset(out_dir, tok, splits, **extra):
    writers = {}
    try:
        for split, ids in splits.items():
            writers[split] = TokenWriter(os.path.join(out_dir, f"{split}.bin"), dtype_for_vocab(tok.vocab_size))
            writers[split].write(ids)
            writers[split].close()
        meta = dataset_meta(tok, {s: w.num_tokens for s, w in writers.items()}, **extra)
        commit_data_dir(out_dir, [f"{s}.bin" for s in splits], meta)
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if isinstance(e, OSError):  # a full disk: one line, the old files as they were
            raise DataError(f"{e.filename or out_dir}: {write_failure(e)}; {out_dir} is unchanged") from None
        raise
    report(out_dir, meta)
    return meta


# ----------------------------------------------------------------------------------------
# resuming a long prepare


class ResumeState:
    """out_dir/prepare.progress.json: what an earlier run with the same inputs and options
    finished (its scan, its tokenizer, how many chunks are in the .partial files). `key`
    identifies the run; a record with another key is ignored and overwritten."""

    def __init__(self, out_dir, key):
        self.path, self.key, self.state = os.path.join(out_dir, PROGRESS), key, {}
        try:
            with open(self.path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(saved, dict) and saved.get("key") == key:
            self.state = saved.get("state", {})
            print(f"resuming from {self.path}", file=sys.stderr)
        else:
            print(f"note: {self.path} is from other inputs or options; starting over",
                  file=sys.stderr)

    def save(self, **updates):
        self.state.update(updates)
        write_json(self.path, {"key": self.key, "state": self.state})

    def clear(self):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


# ----------------------------------------------------------------------------------------
# streaming a corpus through a pool of encoders


def group_chunks(segments, chunk_bytes):
    """(tag, text, ends_doc, nbytes) pieces -> (tag, [(text, ends_doc)], nbytes) chunks of
    about chunk_bytes, each holding pieces of a single tag (e.g. the split)."""
    tag0, group, nbytes = None, [], 0
    for tag, text, ends_doc, n in segments:
        if group and (tag != tag0 or nbytes >= chunk_bytes):
            yield tag0, group, nbytes
            group, nbytes = [], 0
        tag0 = tag
        group.append((text, ends_doc))
        nbytes += n
    if group:
        yield tag0, group, nbytes


def _worker(conn, fn, initializer, initargs):
    _worker_signals()
    failed = None
    try:
        if initializer:
            initializer(*initargs)
    except Exception as e:  # e.g. a tokenizer that cannot load: the parent raises it
        failed = e
    try:
        while (item := conn.recv()) is not None:
            try:
                result = (False, failed) if failed else (True, fn(item))
            except Exception as e:  # raised again in the parent
                result = False, e
            conn.send(result)
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone


def _result(conn, process):
    try:
        ok, value = conn.recv()
    except EOFError:
        raise RuntimeError(f"encoder process {process.pid} died (exit code {process.exitcode})")
    if not ok:
        raise value
    return value


def imap_bounded(fn, items, num_proc, initializer=None, initargs=()):
    """fn over items in num_proc processes, results in input order. Item k goes to worker
    k % num_proc, which holds one item at a time, so memory stays bounded however long the
    input is. Unlike multiprocessing.Pool, no lock is shared with the workers, so they can be
    stopped at any moment (Pool.terminate can hang on the lock an idle worker holds)."""
    if num_proc <= 1:
        if initializer:
            initializer(*initargs)
        for item in items:
            check_interrupted()
            yield fn(item)
        return
    global _deferred
    ctx, workers, busy, finished = multiprocessing.get_context(), [], collections.deque(), False
    try:
        # An interruption while workers start waits until all are started and known: raised
        # inside Process.start it could orphan one, or land in an at-fork hook that swallows
        # it. The signals are blocked too, so a new worker only gets them once it is set up.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        _deferred = True
        try:
            for _ in range(num_proc):
                conn, child = ctx.Pipe()
                process = ctx.Process(target=_worker, args=(child, fn, initializer, initargs),
                                      daemon=True)
                process.start()
                child.close()
                workers.append((conn, process))
        finally:
            _deferred = False
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        check_interrupted()
        for k, item in enumerate(items):
            check_interrupted()
            if len(busy) == num_proc:  # the oldest item in flight is worker k % num_proc's
                yield _result(*workers[busy.popleft()])
            workers[k % num_proc][0].send(item)
            busy.append(k % num_proc)
        while busy:
            check_interrupted()
            yield _result(*workers[busy.popleft()])
        for conn, _ in workers:
            conn.send(None)
        finished = True
    finally:
        for conn, process in workers:
            if not finished:  # stopped early: the workers are killed, not waited for
                process.terminate()
            process.join()
            conn.close()


_worker_tok = None  # the tokenizer of this encoder process


def _init_encoder(meta):
    global _worker_tok
    _worker_tok = tokenizer_from_meta(meta)


def _encode_chunk(chunk):
    tag, segments, nbytes = chunk
    return tag, _worker_tok.encode_segments(segments), nbytes


def encode_chunks(chunks, tok, num_proc):
    """(tag, [(text, ends_doc)], nbytes) chunks -> (tag, ids, nbytes), in order."""
    meta = tok.meta()
    if getattr(tok, "json_text", None) is not None:  # workers get the text: the file may be a .partial
        meta["tokenizer_json"] = tok.json_text
    return imap_bounded(_encode_chunk, chunks, num_proc, _init_encoder, (meta,))


SYNC_EVERY = 16  # chunks between the progress records of a resumable run


def write_stream(out_dir, tok, chunks, num_proc, total_bytes, extra_meta=None, resume=None):
    """Encode chunks tagged 'train' / 'val' into out_dir's train.bin / val.bin and commit
    them (with tokenizer.json for bpe) and meta.json together. With a ResumeState the
    .partial files are kept on failure, their progress recorded, and a later run with the
    same state skips the chunks already written; without one they are removed."""
    with data_dir_held(out_dir):
        return _write_stream(out_dir, tok, chunks, num_proc, total_bytes, extra_meta, resume)


def _write_stream(out_dir, tok, chunks, num_proc, total_bytes, extra_meta=None, resume=None):
    dtype = dtype_for_vocab(tok.vocab_size)
    done = {"chunks": 0, "train": 0, "val": 0, "bytes": 0}  # what the .partial files hold
    saved = resume.state.get("encoded") if resume else None
    if saved and all(os.path.exists(partial_path(out_dir, f"{s}.bin")) and
                     os.path.getsize(partial_path(out_dir, f"{s}.bin")) >= saved[s] * dtype.itemsize
                     for s in ("train", "val")):
        done = saved
    elif saved:
        print("note: the .partial token files of the earlier run are missing or short; "
              "encoding from the start", file=sys.stderr)
    writers, todo = {}, itertools.islice(chunks, done["chunks"], None)
    try:
        for s in ("train", "val"):
            writers[s] = TokenWriter(os.path.join(out_dir, f"{s}.bin"), dtype, done[s])
        with progress(f"encoding ({tok.name})", total_bytes, initial=done["bytes"]) as bar:
            for i, (split, ids, nbytes) in enumerate(encode_chunks(todo, tok, num_proc), 1):
                writers[split].write(ids)
                bar.update(nbytes)
                # one assignment: an interruption sees the record before or after this chunk
                done = {"chunks": done["chunks"] + 1, **{s: w.num_tokens for s, w in writers.items()},
                        "bytes": done["bytes"] + nbytes}
                if resume and i % SYNC_EVERY == 0:
                    for w in writers.values():
                        w.sync()
                    resume.save(encoded=done)
        for split, w in writers.items():
            if w.num_tokens == 0:
                raise DataError(f"no text went to {split}.bin; give more input or change "
                                f"--val_fraction")
            w.close()
    except BaseException:
        if resume:
            # keep what is durable; if even that fails (a full disk), the last record stands and
            # the next run cuts the .partial files back to it
            with contextlib.suppress(OSError):
                for w in writers.values():
                    w.close()
                resume.save(encoded=done)
        else:
            for w in writers.values():
                w.abort()
            discard_partials(out_dir, token_files(tok))
        raise
    meta = dataset_meta(tok, {s: w.num_tokens for s, w in writers.items()}, **(extra_meta or {}))
    commit_data_dir(out_dir, token_files(tok), meta)
    if resume:
        resume.clear()
    report(out_dir, meta)
    return meta


# ----------------------------------------------------------------------------------------
# building a tokenizer from a corpus (char's vocabulary, bpe's merges)


def _chunk_chars(chunk):
    _, segments, nbytes = chunk
    chars = set()
    for text, ends_doc in segments:
        chars.update(text)
        if ends_doc and not text.endswith("\n"):
            chars.add("\n")  # the newline the char join rule adds
    return chars, nbytes


def collect_chars(chunks, num_proc, total):
    """The char tokenizer of every character in the chunks (train and val)."""
    chars = set()
    with progress("collecting characters", total) as bar:
        for found, nbytes in imap_bounded(_chunk_chars, chunks, num_proc):
            chars |= found
            bar.update(nbytes)
    return CharTokenizer(sorted(chars))


def fit_bpe(texts, vocab_size, path, total):
    """train_bpe on texts, an iterator of (text or None, nbytes), with progress for both
    phases; the tokenizer is saved to path.
    The tokenizers library trains in Rust without the GIL, so it runs in a thread while this
    one shows progress and stays interruptible; on an interruption the feeding iterator
    stops first (the thread must be out of Python code before the process exits)."""
    stop, fed, result = threading.Event(), threading.Event(), {}

    def feed(bar):
        try:
            for text, nbytes in texts:  # text None: counted, not trained on (val)
                if stop.is_set():
                    return
                bar.update(nbytes)
                if text is not None:
                    yield text
        except Exception as e:  # reported by the main thread
            result["error"] = e
        finally:
            fed.set()

    def train(bar):
        try:  # saved by the main thread: an abandoned trainer never writes a file
            result["tok"] = train_bpe(feed(bar), vocab_size)
        except Exception as e:
            result.setdefault("error", e)

    with progress(f"bpe:{vocab_size}: reading the train split", total) as bar:
        thread = threading.Thread(target=train, args=(bar,), daemon=True)
        thread.start()
        try:
            while not fed.wait(0.5):
                check_interrupted()
        except BaseException:
            stop.set()
            fed.wait()
            raise
    if "error" not in result:  # no progress comes out of the Rust trainer: show the time taken
        with progress(f"bpe:{vocab_size}: computing merges", None, bar_format="{desc} {elapsed}") as bar:
            last = time.time()
            while thread.is_alive():
                thread.join(0.2)
                check_interrupted()
                if time.time() - last >= bar.mininterval:
                    bar.refresh()
                    last = time.time()
    if "error" in result:
        raise result["error"]
    tok = result["tok"]
    with open(path, "wb") as f:
        f.write(tok.json_text.encode("utf-8"))
    if tok.vocab_size < vocab_size:
        print(f"note: bpe:{vocab_size} cannot be reached: the train split has no more pairs to "
              f"merge after {tok.vocab_size:,} tokens, so the vocabulary has {tok.vocab_size:,}",
              file=sys.stderr)
    return tok


# ----------------------------------------------------------------------------------------
# the small prepare scripts


# argparse, as data/text/prepare.py (which needs it), so every prepare script reads its options alike
def script_args(script_file, description, url=None, argv=None, **options):
    """The options every small prepare script shares: --out_dir (default: the script's own
    dir, where nanoGPT puts its data), for one that downloads its input --url, and
    --name=value for each extra option (typed like its default; str when None)."""
    p = ArgumentParser(description=description)
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(script_file)))
    if url:
        p.add_argument("--url", default=url, help="where to download input.txt if it is missing")
    for name, default in options.items():
        p.add_argument(f"--{name}", default=default, type=type(default) if default else str)
    return p.parse_args(argv)


def fetch_text(path, url):
    """The text at path, downloading it from url first if the file is missing."""
    if not os.path.exists(path):
        download(url, path)
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()

