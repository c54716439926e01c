"""
Tokenizers named by a dataset's meta.json, and the one implementation of writing
train.bin / val.bin + meta.json that every data/*/prepare.py uses.

Encodings:
  char          one id per character; meta.json lists the characters in id order
  <tiktoken>    gpt2, cl100k_base, ... (text encoded with encode_ordinary, so a literal
                "<|endoftext|>" in a document stays text)
  bpe           a byte-level BPE trained by data/text/prepare.py, saved as tokenizer.json
  hf:DIR        the tokenizer.json of a Hugging Face model in DIR (meta.json: encoding 'hf')

Documents: with tiktoken and bpe every document is followed by the end-of-text token; char
has no such token, so a newline is added after a document that does not already end in one.
"""
import collections
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

from dataloader import DataError, dtype_for_vocab, load_meta

EOT = "<|endoftext|>"


class _DocumentEncoder:
    def encode_segments(self, segments):
        """segments: [(text, ends_document)] -> 1-D array of ids, an eot after each document."""
        if self.eot_token is None:
            raise DataError(f"encoding {self.name} has no {EOT} token to end documents with")
        ids = []
        for text, ends_doc in segments:
            ids.extend(self.encode(text))
            if ends_doc:
                ids.append(self.eot_token)
        return np.array(ids, dtype=dtype_for_vocab(self.vocab_size))

    def _check_ids(self, ids):
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"token id {bad[0]} is outside the {self.name} vocabulary of "
                            f"{self.vocab_size}; mask logits at and above vocab_size")


class CharTokenizer(_DocumentEncoder):
    name, eot_token = "char", None

    def __init__(self, chars):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
        # codepoint -> id table; -1 marks characters outside the vocabulary, and so does the
        # last entry, which every larger codepoint is clipped to; >= 256 entries lets latin-1
        # text index it unclipped
        size = max(int(codepoints.max(initial=0)) + 2, 256)
        self._lut = np.full(size, -1, dtype=np.int64)
        self._lut[codepoints] = np.arange(len(codepoints))

    def encode_array(self, text):
        try:  # latin-1 is ~8x faster than utf-32 and covers ASCII text
            cps = np.frombuffer(text.encode("latin-1"), dtype=np.uint8)
        except UnicodeEncodeError:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            cps = np.minimum(cps, np.uint32(len(self._lut) - 1))
        ids = self._lut[cps]
        if ids.min(initial=0) < 0:
            ch = text[int(np.argmax(ids < 0))]  # one code unit per character in both paths
            raise DataError(f"character {ch!r} (U+{ord(ch):04X}) is not in this dataset's "
                            f"vocabulary of {self.vocab_size} characters")
        return ids.astype(dtype_for_vocab(self.vocab_size))

    def encode(self, text):
        return self.encode_array(text).tolist()

    def decode(self, ids):
        ids = list(ids)
        self._check_ids(ids)
        return "".join(self.chars[i] for i in ids)

    def encode_segments(self, segments):
        text = "".join(t + "\n" if end and not t.endswith("\n") else t for t, end in segments)
        return self.encode_array(text)

    def meta(self):
        return {"encoding": "char", "chars": self.chars}


class TiktokenTokenizer(_DocumentEncoder):
    def __init__(self, name):
        import tiktoken
        if name not in tiktoken.list_encoding_names():
            raise DataError(f"unknown encoding {name!r}; use char, bpe:N or a tiktoken "
                            f"encoding ({', '.join(tiktoken.list_encoding_names())})")
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:
            raise DataError(f"cannot load tiktoken encoding {name!r} ({type(e).__name__}); it "
                            f"is downloaded on first use: go online or set TIKTOKEN_CACHE_DIR "
                            f"to a cache that holds it")
        self.name, self.vocab_size = name, self.enc.n_vocab
        self.eot_token = (self.enc.encode_single_token(EOT)
                          if EOT in self.enc.special_tokens_set else None)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        ids = list(ids)
        self._check_ids(ids)
        return self.enc.decode(ids)

    def meta(self):
        return {"encoding": self.name, "eot_token": self.eot_token}


class BPETokenizer(_DocumentEncoder):
    name = "bpe"

    def __init__(self, path, json_text=None):
        from tokenizers import Tokenizer
        if json_text is not None:  # embedded in a checkpoint's meta: no data dir needed
            self.tok = Tokenizer.from_str(json_text)
        elif not os.path.exists(path):
            raise DataError(f"{path} not found; re-run data/text/prepare.py --encoding=bpe:N")
        else:
            self.tok = Tokenizer.from_file(path)
        self.tok.encode_special_tokens = True  # a literal "<|endoftext|>" in text stays text
        self.vocab_size = self.tok.get_vocab_size()
        self.eot_token = self.tok.token_to_id(EOT)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        ids = list(ids)
        self._check_ids(ids)
        return self.tok.decode(ids, skip_special_tokens=False)

    def meta(self):
        return {"encoding": "bpe", "eot_token": self.eot_token, "tokenizer_file": "tokenizer.json"}


class HFTokenizer(BPETokenizer):
    """A Hugging Face model's own tokenizer, encoding 'hf:DIR': DIR/tokenizer.json through the
    tokenizers library, so a corpus is encoded for fine-tuning the model in DIR. Documents end
    with the model's eos_token (from DIR/tokenizer_config.json, which meta.json keeps so that
    hf.py's export can write it back). meta.json names the tokenizer.json by its path; save()
    copies it into a data dir so that the dataset no longer needs DIR."""
    name = "hf"

    def __init__(self, path, json_text=None, tokenizer_config=None):
        if json_text is None and not os.path.exists(path):
            raise DataError(f"{path} not found; encoding hf:DIR needs a Hugging Face model directory "
                            f"with a tokenizer.json")
        super().__init__(path, json_text)
        self.path, self.tokenizer_config = path, tokenizer_config or {}
        eos = self.tokenizer_config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eot_token = self.tok.token_to_id(eos) if eos else None

    @classmethod
    def from_dir(cls, hf_dir):
        config, path = {}, os.path.join(hf_dir, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f)
        return cls(os.path.abspath(os.path.join(hf_dir, "tokenizer.json")), tokenizer_config=config)

    def save(self, data_dir):
        """Copy tokenizer.json into data_dir; meta() then names it relative to the data dir."""
        dst = os.path.join(data_dir, "tokenizer.json")
        shutil.copyfile(self.path, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
        self.path = "tokenizer.json"

    def meta(self):
        return {"encoding": "hf", "eot_token": self.eot_token, "tokenizer_file": self.path,
                "tokenizer_config": self.tokenizer_config}


def get_tokenizer(encoding):
    """A tokenizer by name alone (e.g. 'gpt2' for a checkpoint initialised from GPT-2, or
    'hf:DIR' for the tokenizer of the Hugging Face model in DIR)."""
    if encoding in ("char", "bpe", "hf"):
        raise DataError(f"encoding {encoding!r} is defined by a dataset; use "
                        f"load_tokenizer(data_dir) with the dir that has its meta.json")
    if encoding.startswith("hf:"):
        return HFTokenizer.from_dir(encoding[3:])
    return TiktokenTokenizer(encoding)


def tokenizer_from_meta(meta, data_dir=None):
    encoding = meta.get("encoding", "gpt2")
    if encoding == "char":
        return CharTokenizer(meta["chars"])
    if encoding == "bpe":
        return BPETokenizer(os.path.join(data_dir or ".", meta.get("tokenizer_file", "tokenizer.json")),
                            meta.get("tokenizer_json"))
    if encoding == "hf":  # tokenizer_file may be an absolute path (in the model's dir)
        return HFTokenizer(os.path.join(data_dir or ".", meta.get("tokenizer_file", "tokenizer.json")),
                           meta.get("tokenizer_json"), meta.get("tokenizer_config"))
    return get_tokenizer(encoding)


def load_tokenizer(data_dir):
    """The tokenizer a prepared data dir was written with (gpt2 when it has no meta)."""
    return tokenizer_from_meta(load_meta(data_dir), data_dir)


def train_bpe(texts, vocab_size, path):
    """Train a byte-level BPE (exact round trip for any text) on an iterator of strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    if vocab_size < 257:
        raise DataError(f"bpe vocab size {vocab_size} is too small: it needs 256 byte tokens "
                        f"plus {EOT}, use bpe:N with N >= 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(path)
    return BPETokenizer(path)


# ----------------------------------------------------------------------------------------
# writing token files


class TokenWriter:
    """Appends ids to <path>.partial; commit() renames it to <path>, so an interrupted run
    never leaves a complete-looking train.bin. resume_tokens > 0 continues a .partial file
    from that many tokens (anything after them, e.g. a torn write, is cut off)."""

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
        """Stop, keeping the .partial file for a later resume."""
        self.f.close()

    def commit(self):
        self.f.close()
        os.replace(self.partial, self.path)

    def abort(self):
        self.f.close()
        os.remove(self.partial)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)  # readers never see half a file


def write_meta(out_dir, tok, counts):
    meta = {**tok.meta(), "vocab_size": tok.vocab_size,
            "dtype": dtype_for_vocab(tok.vocab_size).name,
            "train_tokens": counts["train"], "val_tokens": counts["val"]}
    write_json(os.path.join(out_dir, "meta.json"), meta)
    print(f"{out_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens, "
          f"vocab {tok.vocab_size:,} ({tok.name}, {meta['dtype']})")


def write_dataset(out_dir, tok, splits):
    """Small in-memory datasets: splits = {'train': ids, 'val': ids}."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, ids in splits.items():
        w = TokenWriter(os.path.join(out_dir, f"{split}.bin"), dtype_for_vocab(tok.vocab_size))
        w.write(ids)
        w.commit()
        counts[split] = w.num_tokens
    write_meta(out_dir, tok, counts)
    return counts


# ----------------------------------------------------------------------------------------
# streaming a corpus through a pool of encoders


class Progress:
    """One status line on stderr: done / total and throughput (no tqdm needed)."""

    def __init__(self, label, total, unit="MB"):
        self.label, self.total, self.done, self.unit = label, total, 0, unit
        self.scale = 1e6 if unit == "MB" else 1
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, nbytes):
        self.done += nbytes
        now = time.time()
        # a terminal gets one line redrawn in place; a log file gets a line every 5 s
        if now - self.last >= (0.2 if self.tty else 5.0):
            self.last = now
            self._show()

    def _show(self, final=False):
        rate = self.done / max(time.time() - self.t0, 1e-9) / self.scale
        d = 1 if self.unit == "MB" else 0  # decimals
        line = (f"{self.label}: {self.done / self.scale:,.{d}f}/{self.total / self.scale:,.{d}f} "
                f"{self.unit} ({100 * self.done / max(self.total, 1):.0f}%) "
                f"{rate:,.1f} {self.unit}/s")
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        self.done = self.total
        self._show(final=True)


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


def imap_bounded(fn, items, num_proc, initializer=None, initargs=()):
    """fn over items in num_proc processes, results in input order. Unlike Pool.imap, which
    drains its whole input into a queue, at most num_proc + 2 items are in flight, so memory
    stays bounded however long the input is."""
    if num_proc <= 1:
        if initializer:
            initializer(*initargs)
        yield from map(fn, items)
        return
    with multiprocessing.Pool(num_proc, initializer, initargs) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= num_proc + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker_tok = None  # the tokenizer of this encoder process


def _init_encoder(meta, data_dir):
    global _worker_tok
    _worker_tok = tokenizer_from_meta(meta, data_dir)


def _encode_chunk(chunk):
    tag, segments, nbytes = chunk
    return tag, _worker_tok.encode_segments(segments), nbytes


def encode_chunks(chunks, tok, data_dir, num_proc):
    """(tag, [(text, ends_doc)], nbytes) chunks -> (tag, ids, nbytes), in order."""
    return imap_bounded(_encode_chunk, chunks, num_proc, _init_encoder, (tok.meta(), data_dir))


def write_stream(out_dir, tok, chunks, num_proc, total_bytes):
    """Encode chunks tagged 'train' / 'val' into out_dir's train.bin / val.bin + meta.json."""
    dtype = dtype_for_vocab(tok.vocab_size)
    writers = {s: TokenWriter(os.path.join(out_dir, f"{s}.bin"), dtype) for s in ("train", "val")}
    progress = Progress(f"encoding ({tok.name})", total_bytes)
    try:
        for split, ids, nbytes in encode_chunks(chunks, tok, out_dir, num_proc):
            writers[split].write(ids)
            progress.update(nbytes)
        progress.close()
        for split, w in writers.items():
            if w.num_tokens == 0:
                raise DataError(f"no text went to {split}.bin; give more input or change "
                                f"--val_fraction")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.commit()
    counts = {s: w.num_tokens for s, w in writers.items()}
    write_meta(out_dir, tok, counts)
    return counts


def run_cli(main):
    """Run a prepare script's main(): bad input is one `error: ...` line and exit status 1."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def script_args(script_file, description, url=None, argv=None, **options):
    """The options every small prepare script shares: --out_dir (default: the script's own
    dir, where nanoGPT puts its data), for one that downloads its input --url, and
    --name=value for each extra option (typed like its default; str when None)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one `error:` line and status 1, like other bad input
            raise DataError(message)

    p = Parser(description=description)
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(script_file)))
    if url:
        p.add_argument("--url", default=url, help="where to download input.txt if it is missing")
    for name, default in options.items():
        p.add_argument(f"--{name}", default=default, type=type(default) if default else str)
    return p.parse_args(argv)


def fetch_text(path, url):
    """The text at path, downloading it from url first if the file is missing."""
    if not os.path.exists(path):
        import urllib.request
        print(f"downloading {url} to {path}")
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                data = r.read()
        except OSError as e:
            raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}); put the "
                            f"file at {path} and re-run")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()
