"""
Tokenizers named by a dataset's meta.json (writing datasets is dataprep.py's job).

Encodings:
  char          one id per character; meta.json lists the characters in id order
  <tiktoken>    gpt2, cl100k_base, ... (text encoded with encode_ordinary, so a literal
                "<|endoftext|>" in a document stays text)
  bpe           a byte-level BPE trained by data/text/prepare.py, saved as tokenizer.json
  hf:DIR        the tokenizer.json of a Hugging Face model in DIR (meta.json: encoding 'hf')
  char:DIR      the characters of DIR's meta.json: a char-level data dir, or the HF dir export.py
                wrote for a char-level checkpoint (meta.json: encoding 'char', those characters)

Documents: with tiktoken and bpe every document is followed by the end-of-text token; char
has no such token, so a newline is added after a document that does not already end in one.

meta.json's tokenizer_fingerprint (dataloader.tokenizer_fingerprint) ties a data dir, and every
checkpoint trained on it, to exactly one tokenizer: tokenizer_from_meta refuses another.
"""
import json
import os
import shutil

import numpy as np

from gpt_trainer.dataloader import dtype_for_vocab, fingerprint, load_meta, tokenizer_fingerprint
from gpt_trainer.errors import DataError

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

    def fingerprint(self):
        return tokenizer_fingerprint(self.meta())


class CharTokenizer(_DocumentEncoder):
    name, eot_token = "char", None

    def __init__(self, chars, source=None):
        self.chars, self.source = list(chars), source
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
            of = f" of {self.source}" if self.source else ""
            raise DataError(f"character {ch!r} (U+{ord(ch):04X}) is not in the char vocabulary{of} "
                            f"({self.vocab_size} characters)")
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
        if json_text is None:  # else embedded in a checkpoint's meta: no data dir needed
            if not os.path.exists(path):
                raise DataError(f"{path} not found; re-run data/text/prepare.py --encoding=bpe:N")
            with open(path, "rb") as f:  # bytes: the fingerprint is of the file as written
                json_text = f.read().decode("utf-8")
        self.json_text = json_text
        try:
            self.tok = Tokenizer.from_str(json_text)
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            where = path if path else "the tokenizer.json embedded in the checkpoint"
            raise DataError(f"{where}: the tokenizers library cannot read it ({str(e)[:200]}); it is damaged or "
                            f"from a newer tokenizers: copy it again or upgrade tokenizers")
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

    def fingerprint(self):
        return fingerprint(self.json_text)


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
    if encoding.startswith("char:"):
        return char_tokenizer_of(encoding[5:])
    return TiktokenTokenizer(encoding)


def char_tokenizer_of(path):
    """The characters of a char-level data dir (ours or nanoGPT's) or of the HF dir export.py
    wrote for a char-level checkpoint: new data for a model that knows only those characters."""
    meta = load_meta(path) if os.path.isdir(path) else {}
    if meta.get("encoding") != "char":
        raise DataError(f"encoding char:{path}: {path} has no char-level meta.json (or nanoGPT meta.pkl); "
                        f"name a char-level data dir, or the dir export.py wrote for a char-level checkpoint")
    return CharTokenizer(meta["chars"], source=path)


def tokenizer_from_meta(meta, data_dir=None):
    """The tokenizer meta names, refused if it is not the one meta was written with (another
    tokenizer.json beside an old meta.json, a vocabulary of another size)."""
    tok = _tokenizer(meta, data_dir)
    embedded = data_dir is None or meta.get("tokenizer_json") is not None  # a checkpoint's meta
    check_tokenizer(tok, meta, "the checkpoint's meta" if embedded else os.path.join(data_dir, "meta.json"))
    return tok


def check_tokenizer(tok, meta, where):
    expected = meta.get("tokenizer_fingerprint")
    found = tok.fingerprint() if expected and hasattr(tok, "fingerprint") else expected
    if found != expected:
        file = f"{meta.get('tokenizer_file')} " if meta.get("tokenizer_file") else ""
        raise DataError(f"the {tok.name} tokenizer {file}({found[:19]}...) is not the one {where} was "
                        f"written with ({expected[:19]}...); re-run the dataset's prepare.py")
    if meta.get("vocab_size") not in (None, tok.vocab_size):
        raise DataError(f"the {tok.name} tokenizer has {tok.vocab_size:,} tokens but {where} says "
                        f"vocab_size {meta['vocab_size']:,}; they do not belong together, re-run "
                        f"the dataset's prepare.py")


def _tokenizer(meta, data_dir):
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


def other_id(model_tok, data_tok):
    """None when each id of data_tok stands for the same bytes in model_tok (which may have more
    ids: a chat template's, padding), else where they first differ, in words."""
    if model_tok.fingerprint() == data_tok.fingerprint():
        return None
    theirs, ours = token_table(model_tok), token_table(data_tok)
    bad = next((i for i, piece in enumerate(ours) if i >= len(theirs) or theirs[i] != piece), None)
    if bad is None:
        return None
    there = _show_piece(theirs[bad]) if bad < len(theirs) else "not there"
    return f"id {bad} is {_show_piece(ours[bad])} in the data, {there} in the model"


def _show_piece(piece):
    if piece is None:
        return "unused"
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:  # a part of a character
        return repr(piece)


def token_table(tok):
    """The bytes each id stands for (None for an id left unused), comparable across libraries:
    tiktoken's gpt2 gives the table of GPT-2's tokenizer.json."""
    if isinstance(tok, CharTokenizer):
        return [c.encode("utf-8") for c in tok.chars]
    if isinstance(tok, TiktokenTokenizer):
        return [_tiktoken_bytes(tok.enc, i) for i in range(tok.vocab_size)]
    byte_of = _byte_level_bytes()
    table = []
    for i in range(tok.vocab_size):
        piece = tok.tok.id_to_token(i)
        if piece is not None and all(c in byte_of for c in piece):
            table.append(bytes(byte_of[c] for c in piece))
        else:
            table.append(None if piece is None else piece.encode("utf-8"))
    return table


def _byte_level_bytes():
    """Byte-level BPE (GPT-2's tokenizer.json) writes each byte as a printable character: the
    printable bytes as themselves, the other 68 as U+0100 onwards in byte order. char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _tiktoken_bytes(enc, i):
    try:
        return enc.decode_single_token_bytes(i)
    except KeyError:  # e.g. cl100k_base leaves some ids below n_vocab unused
        return None


def load_tokenizer(data_dir):
    """The tokenizer a prepared data dir was written with (gpt2 when it has no meta)."""
    return tokenizer_from_meta(load_meta(data_dir), data_dir)


def train_bpe(texts, vocab_size, path=None):
    """Train a byte-level BPE (exact round trip for any text) on an iterator of strings;
    saved as path (a tokenizer.json) if given."""
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
    if path is None:
        return BPETokenizer(None, tok.to_str(pretty=True))
    tok.save(path)
    return BPETokenizer(path)
