"""
Reading token files for training: meta.json / nanoGPT meta.pkl, validation of
train.bin / val.bin, and batch sampling that is a pure function of (seed, step, micro-batch),
so that resume is exact and the data order does not depend on the world size.

Two samplers:
  random  every row of a batch is a window at a random offset (nanoGPT's get_batch)
  epoch   the file is cut into block-aligned windows and each epoch visits every window
          exactly once, in a permutation that depends only on (seed, epoch)
"""
import hashlib
import json
import os
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gpt_trainer.errors import DataError

# torch is imported inside the functions that use it: the data/*/prepare.py scripts only
# need metadata and DataError from here, and importing torch costs them seconds.

SAMPLING_MODES = ("random", "epoch")


class _PlainUnpickler(pickle.Unpickler):
    # nanoGPT's meta.pkl is a dict of ints/strs; refusing every global means a handed-over
    # pickle can never run code, it can only fail to load.
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_meta(data_dir):
    """meta.json (ours), else nanoGPT's meta.pkl read without executing code, else {}."""
    json_path = os.path.join(data_dir, "meta.json")
    pkl_path = os.path.join(data_dir, "meta.pkl")
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{json_path}: not valid JSON ({e}); re-run the dataset's prepare.py")
        _check_meta(meta, json_path)
        return meta
    if os.path.exists(pkl_path):
        try:
            with open(pkl_path, "rb") as f:
                meta = _PlainUnpickler(f).load()
        except Exception as e:
            raise DataError(f"{pkl_path}: cannot be read as plain data ({e}); re-run prepare.py")
        if not isinstance(meta, dict):
            raise DataError(f"{pkl_path}: expected a dict, found {type(meta).__name__}")
        meta.setdefault("encoding", "char" if "stoi" in meta or "itos" in meta else "gpt2")
        if meta["encoding"] == "char" and "chars" not in meta:
            meta["chars"] = _chars_from_nanogpt(meta, pkl_path)
        _check_meta(meta, pkl_path)
        return meta
    return {}


def _chars_from_nanogpt(meta, path):
    # nanoGPT stores itos = {id: char} (and its inverse stoi); we keep one list in id order
    itos = meta.get("itos") or {i: c for c, i in meta.get("stoi", {}).items()}
    if sorted(itos) != list(range(len(itos))):
        raise DataError(f"{path}: itos/stoi ids are not 0..{len(itos) - 1}; re-run prepare.py")
    return [itos[i] for i in range(len(itos))]


def _check_meta(meta, path):
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    vocab_size = meta.get("vocab_size")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= 0):
        raise DataError(f"{path}: vocab_size {vocab_size!r} is not a positive integer")
    if not isinstance(meta.get("encoding", ""), str):
        raise DataError(f"{path}: encoding {meta['encoding']!r} is not a string")
    if meta.get("encoding") == "char":
        chars = meta.get("chars")
        if (not isinstance(chars, list) or len(set(chars)) != len(chars)
                or not all(isinstance(c, str) and len(c) == 1 for c in chars)):
            raise DataError(f"{path}: 'chars' must be a list of distinct single characters")
        if vocab_size is not None and vocab_size != len(chars):
            raise DataError(f"{path}: vocab_size {vocab_size} but {len(chars)} chars; re-run prepare.py")
    dtype = token_dtype(meta)
    if vocab_size is not None and vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"{path}: vocab_size {vocab_size} does not fit dtype {dtype.name}; "
                        f"re-run prepare.py")
    fp = meta.get("tokenizer_fingerprint")
    if fp is not None and not (isinstance(fp, str) and fp.startswith("sha256:")):
        raise DataError(f"{path}: tokenizer_fingerprint {fp!r} is not 'sha256:<hex>'; re-run prepare.py")


def fingerprint(data):
    """'sha256:<hex>' of bytes (a str is taken as its UTF-8)."""
    return "sha256:" + hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def tokenizer_fingerprint(meta, data_dir=None):
    """The fingerprint of the tokenizer meta describes, from what defines it: a tokenizer file's
    bytes (bpe's tokenizer.json, or its copy embedded in a checkpoint's meta), a char
    vocabulary, else the encoding's name (tiktoken's encodings are fixed)."""
    if meta.get("tokenizer_json") is not None:
        return fingerprint(meta["tokenizer_json"])
    if meta.get("tokenizer_file") or meta.get("encoding") == "bpe":
        path = os.path.join(data_dir or ".", meta.get("tokenizer_file") or "tokenizer.json")
        try:
            with open(path, "rb") as f:
                return fingerprint(f.read())
        except OSError as e:
            raise DataError(f"{path}: cannot read the dataset's tokenizer ({e.strerror}); re-run "
                            f"the dataset's prepare.py")
    if meta.get("encoding") == "char":
        return fingerprint(json.dumps(meta["chars"], ensure_ascii=False))
    return fingerprint(meta.get("encoding", "gpt2"))


def describe_tokenizer(meta):
    vocab = f", {meta['vocab_size']:,} tokens" if meta.get("vocab_size") else ""
    return f"{meta.get('encoding', 'gpt2')}{vocab}"


def check_same_tokenizer(saved_meta, meta, ckpt_path, data_dir=None):
    """Refuse to resume a checkpoint on data encoded with another tokenizer (even one with the
    same vocab size: the ids would mean other text). saved_meta is the checkpoint's meta (None
    for a checkpoint that records none, e.g. nanoGPT's: nothing to compare)."""
    if saved_meta is None:
        return
    try:
        saved = saved_meta.get("tokenizer_fingerprint") or tokenizer_fingerprint(saved_meta)
    except DataError:
        return  # a bpe checkpoint from before tokenizers were embedded: nothing to compare
    now = meta.get("tokenizer_fingerprint") or tokenizer_fingerprint(meta, data_dir)
    if saved != now:
        where = f"{data_dir}'s" if data_dir else "this dataset's"
        raise DataError(f"{where} tokenizer ({describe_tokenizer(meta)}, {now[:19]}...) is not the one "
                        f"{ckpt_path} was trained with ({describe_tokenizer(saved_meta)}, "
                        f"{saved[:19]}...); resume on data prepared with the checkpoint's tokenizer, "
                        f"or train from scratch in another out_dir")


def token_dtype(meta):
    name = meta.get("dtype", "uint16")  # nanoGPT data dirs are uint16 without saying so
    if name not in ("uint16", "uint32"):
        raise DataError(f"meta.json: dtype {name!r} is not uint16 or uint32")
    return np.dtype(name)


def data_vocab_size(meta):
    """Ids a dataset may hold: its tokenizer's, plus a chat template's special ids (meta 'chat')."""
    return (meta.get("chat") or {}).get("vocab_size") or meta.get("vocab_size")


def dtype_for_vocab(vocab_size):
    """The smallest token dtype that holds every id below vocab_size."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class TokenFile:
    """A flat file of token ids, read with pread so resident memory stays flat however
    large the file is (a memmap would keep every page it touched resident)."""

    def __init__(self, path, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        size = os.path.getsize(path)
        if size % self.dtype.itemsize:
            raise DataError(f"{path}: {size} bytes is not a whole number of {self.dtype.name} "
                            f"tokens; meta.json's dtype disagrees with the file, re-run prepare.py")
        self.num_tokens = size // self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self):
        return self.num_tokens

    def read(self, start, count):
        nbytes = count * self.dtype.itemsize
        buf = os.pread(self.fd, nbytes, start * self.dtype.itemsize)
        if len(buf) != nbytes:
            raise DataError(f"{self.path}: short read at token {start}; the file shrank "
                            f"while training, re-run prepare.py")
        return np.frombuffer(buf, dtype=self.dtype)

    def max_token(self, chunk=1 << 22):
        """Largest id in the file, streamed in chunks (no page cache kept resident)."""
        hi = 0
        for start in range(0, self.num_tokens, chunk):
            hi = max(hi, int(self.read(start, min(chunk, self.num_tokens - start)).max()))
        return hi

    def close(self):
        os.close(self.fd)


def open_dataset(data_dir, block_size, vocab_size=None, check_ids=True):
    """Open and validate train.bin and val.bin. Returns ({'train': TokenFile, 'val': ...}, meta).
    vocab_size is the model's; ids must be below it and below meta's vocab_size."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data dir {data_dir} not found; run data/<dataset>/prepare.py first "
                        f"or set --dataset to a prepared dataset")
    meta = load_meta(data_dir)
    dtype = token_dtype(meta)
    _check_tokenizer_file(meta, data_dir)
    splits = {}
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.exists(path):
            raise DataError(f"{path} not found; run the dataset's prepare.py to create it")
        tf = TokenFile(path, dtype)
        expected = meta.get(f"{split}_tokens")
        if expected is not None and expected != len(tf):
            raise DataError(f"{path}: {len(tf)} {dtype.name} tokens but meta.json says "
                            f"{expected}; the file is truncated or stale, re-run prepare.py")
        if len(tf) < block_size + 1:
            raise DataError(f"{path}: {len(tf)} tokens is shorter than block_size + 1 = "
                            f"{block_size + 1}; lower --block_size or add data")
        if check_ids:
            _check_ids(tf, data_vocab_size(meta), vocab_size)
        splits[split] = tf
    return splits, meta


def _check_tokenizer_file(meta, data_dir):
    """A tokenizer file must be the one meta.json was written with (an interrupted or failed
    prepare could leave another beside it). Its text goes into meta as tokenizer_json, so a
    checkpoint carries its tokenizer wherever the data dir goes."""
    if not (meta.get("tokenizer_file") or meta.get("encoding") == "bpe"):
        return
    path = os.path.join(data_dir, meta.get("tokenizer_file") or "tokenizer.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the dataset's tokenizer ({e.strerror}); re-run the "
                        f"dataset's prepare.py")
    found, expected = fingerprint(data), meta.get("tokenizer_fingerprint")
    if expected is not None and found != expected:
        raise DataError(f"{path} ({found[:19]}...) is not the tokenizer meta.json was written with "
                        f"({expected[:19]}...); the data dir is inconsistent, re-run its prepare.py")
    meta["tokenizer_json"] = data.decode("utf-8")


def _check_ids(tf, meta_vocab, model_vocab):
    if meta_vocab is None and model_vocab is None:
        return
    hi = tf.max_token()
    if meta_vocab is not None and hi >= meta_vocab:
        raise DataError(f"{tf.path}: token id {hi} >= vocab_size {meta_vocab} of meta.json; "
                        f"the file and meta.json disagree, re-run prepare.py")
    if model_vocab is not None and hi >= model_vocab:
        raise DataError(f"{tf.path}: token id {hi} >= the model's vocab_size {model_vocab}; "
                        f"set --vocab_size to at least {hi + 1}")


def batch_generator(seed, step, index):
    """A generator whose draws depend only on (seed, step, index): a stateless sampler, so
    nothing about the data order has to be saved for an exact resume."""
    import torch
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) * 1_000_033 + index)
    return g


def random_starts(num_tokens, block_size, batch_size, seed, step, index):
    import torch
    g = batch_generator(seed, step, index)
    return torch.randint(num_tokens - block_size, (batch_size,), generator=g).tolist()


def read_windows(data, starts, block_size):
    """(B, T) int64 x and y = x shifted by one, both contiguous, for windows at `starts`."""
    import torch
    rows = np.empty((len(starts), block_size + 1), dtype=np.int64)
    for row, start in zip(rows, starts):
        row[:] = data.read(int(start), block_size + 1)
    xy = torch.from_numpy(rows)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def get_batch(data, block_size, batch_size, seed, step, index):
    """Random windows for global micro-batch `index` of optimizer step `step`: (B, T) x and y.
    The same (seed, step, index) always gives the same windows, on any rank."""
    starts = random_starts(len(data), block_size, batch_size, seed, step, index)
    return read_windows(data, starts, block_size)


class EpochSampler:
    """Global sample n is window perm_e[n % W] of epoch e = n // W, where the W windows start
    at k * block_size and perm_e depends only on (seed, e). Any set of ranks that together
    ask for samples 0..N-1 sees every window once per epoch, whatever the world size."""

    def __init__(self, num_tokens, block_size, seed):
        self.block_size, self.seed = block_size, seed
        # the last window needs block_size + 1 tokens (y is x shifted by one)
        self.num_windows = (num_tokens - 1) // block_size
        self._perms = {}  # epoch -> permutation; at most two (a batch may span a boundary)
        self._lock = threading.Lock()  # the prefetch thread and get() share the cache

    def _perm(self, epoch):
        with self._lock:
            if epoch not in self._perms:
                import torch
                g = torch.Generator()
                g.manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.num_windows, generator=g).numpy()
                # int32 halves the cache: 1e8 windows is 400 MB instead of 800 MB
                if self.num_windows < 2**31:
                    perm = perm.astype(np.int32)
                if len(self._perms) >= 2:
                    del self._perms[min(self._perms)]
                self._perms[epoch] = perm
            return self._perms[epoch]

    def starts(self, first_sample, count):
        n = np.arange(first_sample, first_sample + count, dtype=np.int64)
        epochs, pos = n // self.num_windows, n % self.num_windows
        windows = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            windows[sel] = self._perm(int(epoch))[pos[sel]]
        return windows * self.block_size


class BatchLoader:
    """Batches for training on `device`: loader.get(step, index) gives the (x, y) of global
    micro-batch `index` (0 <= index < micro_steps_per_step) of optimizer step `step`.

    A rank that asks for indices rank_first_index .. rank_first_index + rank_num_micro - 1 of
    every step in order gets each next micro-batch read ahead in a background thread. Any
    other order still works (the batch is then read on the spot): the result never depends
    on prefetching, only wait_time does."""

    def __init__(self, data, block_size, batch_size, seed, micro_steps_per_step,
                 sampling="random", device="cpu", prefetch=True, rank_first_index=0,
                 rank_num_micro=None):
        import torch
        if sampling not in SAMPLING_MODES:
            raise DataError(f"sampling={sampling!r} is not one of {', '.join(SAMPLING_MODES)}")
        if batch_size < 1 or micro_steps_per_step < 1:
            raise DataError(f"batch_size ({batch_size}) and micro_steps_per_step "
                            f"({micro_steps_per_step}) must be at least 1")
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed, self.micro_steps_per_step, self.sampling = seed, micro_steps_per_step, sampling
        self.device = torch.device(device)
        self.rank_first_index = rank_first_index
        self.rank_num_micro = rank_num_micro or micro_steps_per_step
        if sampling == "epoch":
            self.epochs = EpochSampler(len(data), block_size, seed)
        self.wait_time = 0.0  # seconds the training loop spent waiting for data
        self._executor = ThreadPoolExecutor(1, "prefetch") if prefetch else None
        self._pending = None  # ((step, index), Future) of the batch being read ahead

    def _starts(self, step, index):
        if self.sampling == "random":
            return random_starts(len(self.data), self.block_size, self.batch_size,
                                 self.seed, step, index)
        first = (step * self.micro_steps_per_step + index) * self.batch_size
        return self.epochs.starts(first, self.batch_size)

    def _host_batch(self, step, index):
        x, y = read_windows(self.data, self._starts(step, index), self.block_size)
        if self.device.type == "cuda":
            # page-locked so the copy to the GPU can run asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _next_key(self, step, index):
        if index + 1 < self.rank_first_index + self.rank_num_micro:
            return step, index + 1
        return step + 1, self.rank_first_index

    def get(self, step, index):
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (step, index):
            x, y = pending[1].result()
        else:
            x, y = self._host_batch(step, index)
        if self._executor is not None:
            key = self._next_key(step, index)
            self._pending = (key, self._executor.submit(self._host_batch, *key))
        non_blocking = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=non_blocking)
        y = y.to(self.device, non_blocking=non_blocking)
        self.wait_time += time.perf_counter() - t0
        return x, y

    def state_dict(self, step):
        """Plain data for the checkpoint. The sampler is stateless, so `step` alone resumes
        exactly; this records what the order depends on so a resume can check it."""
        d = {"sampling": self.sampling, "seed": self.seed, "step": step,
             "block_size": self.block_size,
             "samples_per_step": self.batch_size * self.micro_steps_per_step}
        if self.sampling == "epoch":
            seen = step * d["samples_per_step"]
            d.update(num_windows=self.epochs.num_windows, epoch=seen // self.epochs.num_windows,
                     epoch_position=seen % self.epochs.num_windows)
        return d

    def load_state_dict(self, d):
        """Raise DataError if resuming with this loader would not continue the saved order."""
        if d.get("sampling", "random") != self.sampling:
            raise DataError(f"checkpoint was trained with sampling={d.get('sampling')!r} but "
                            f"this run uses {self.sampling!r}; set --sampling="
                            f"{d.get('sampling')} to resume")
        if self.sampling != "epoch":
            return  # random batches depend on (seed, step) only; a new seed is a choice
        now = self.state_dict(d.get("step", 0))
        for key in ("seed", "block_size", "samples_per_step", "num_windows"):
            if key in d and d[key] != now[key]:
                raise DataError(f"checkpoint's epoch sampler had {key}={d[key]} but this run "
                                f"has {now[key]}; resuming would repeat or skip data, so use "
                                f"the checkpoint's settings (and data) or sampling=random")

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor, self._pending = None, None
