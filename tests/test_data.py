"""Data preparation, tokenizers and batch loading. The two big-file tests (1 GB prepare,
2 GB train.bin) are part of the normal run: they take ~30 s together on 2 cores."""
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataloader import (BatchLoader, DataError, TokenFile, get_batch, load_meta,
                        open_dataset)
from tokenizer import CharTokenizer, get_tokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
EOT = "<|endoftext|>"


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def read_split(data_dir, split):
    meta = load_meta(data_dir)
    return np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"])


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------
# data/text/prepare.py


def make_corpus(root):
    """A small multi-document corpus; returns the documents in the order prepare reads them."""
    docs = {
        "a.txt": "First line.\nSecond line with ünïcödé, 日本語 and 🙂.\n" * 40,
        "b.jsonl": None,
        "c.txt": "",  # empty documents are skipped
        "sub/d.txt": "windows\r\nline endings\r\nand no newline at the end" * 30,
    }
    records = ["json doc one with a literal " + EOT + " in it", "", "json\ndoc\tthree 🙂"]
    os.makedirs(os.path.join(root, "sub"))
    for name, text in docs.items():
        with open(os.path.join(root, name), "w", encoding="utf-8", newline="") as f:
            if name.endswith(".jsonl"):
                f.write("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(records)))
                f.write("\n\n")  # blank lines are ignored
            else:
                f.write(text)
    return [docs["a.txt"]] + [r for r in records if r] + [docs["sub/d.txt"]]


@pytest.mark.parametrize("encoding", ["char", "gpt2", "cl100k_base", "bpe:300"])
def test_text_round_trip(tmp_path, encoding):
    docs = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    r = run("data/text/prepare.py", f"--input={tmp_path / 'in'}", f"--encoding={encoding}",
            f"--out_dir={out}", "--num_proc=2", "--val_fraction=0.25")
    assert r.returncode == 0, r.stderr
    meta = load_meta(out)
    tok = load_tokenizer(out)
    train, val = read_split(out, "train"), read_split(out, "val")
    if encoding == "char":
        expected = "".join(d if d.endswith("\n") else d + "\n" for d in docs)
    else:
        expected = "".join(d + EOT for d in docs)
        assert tok.eot_token == meta["eot_token"] and (train == tok.eot_token).sum() > 0
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == expected
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert 0 < len(val) < len(train) and max(train.max(), val.max()) < meta["vocab_size"]
    if encoding.startswith("bpe"):
        assert meta["vocab_size"] <= 300 and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("encoding,dtype,itemsize", [("gpt2", "uint16", 2),
                                                      ("cl100k_base", "uint32", 4)])
def test_token_dtype(tmp_path, encoding, dtype, itemsize):
    (tmp_path / "in.txt").write_text("some text to encode\n" * 50)
    r = run("data/text/prepare.py", f"--input={tmp_path / 'in.txt'}", f"--encoding={encoding}",
            f"--out_dir={tmp_path / 'out'}", "--num_proc=1")
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path / "out")
    assert meta["dtype"] == dtype
    size = os.path.getsize(tmp_path / "out" / "train.bin")
    assert size == itemsize * meta["train_tokens"]
    if encoding == "cl100k_base":
        assert read_split(tmp_path / "out", "val").max() > 65535  # eot 100257 needs uint32


def test_chunking_at_line_boundaries(tmp_path):
    """Tiny chunks: pieces cut at line ends (or inside a too-long line at a character
    boundary) give back the file exactly, and char tokens equal whole-file encoding."""
    text_prepare = load_module("data/text/prepare.py", "text_prepare")
    text = "short\n" + "ü日🙂x" * 50 + "\nlines\n" * 30 + "tail without newline"
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    segments = list(text_prepare.corpus_segments([str(path)], 0.3, "text", chunk_bytes=16))
    assert "".join(t for _, t, _, _ in segments) == text
    assert [end for _, _, end, _ in segments] == [False] * (len(segments) - 1) + [True]
    val = "".join(t for split, t, _, _ in segments if split == "val")
    assert text.endswith(val) and text[len(text) - len(val) - 1] == "\n"  # val starts a line
    assert 0.2 < len(val.encode()) / len(text.encode()) < 0.4
    tok = CharTokenizer(sorted(set(text + "\n")))
    chunked = tok.encode_segments([(t, end) for _, t, end, _ in segments])
    assert chunked.tolist() == tok.encode(text + "\n")


def test_text_prepare_errors(tmp_path):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"ok\n\xff\xfe\n")
    no_field = tmp_path / "x.jsonl"
    no_field.write_text('{"body": "hi"}\n')
    cases = [
        ([f"--input={tmp_path / 'missing.txt'}"], "missing.txt"),
        ([f"--input={bad_utf8}"], "bad.txt"),
        ([f"--input={no_field}"], "x.jsonl:1"),
        ([f"--input={bad_utf8}", "--encoding=no_such_encoding"], "no_such_encoding"),
        ([f"--input={no_field}", "--val_fraction=1.5"], "val_fraction"),
        ([f"--input={no_field}", "--encoding=bpe:abc"], "bpe:abc"),
        (["--bogus=1"], "--bogus"),
    ]
    for args, needle in cases:
        r = run("data/text/prepare.py", *args, f"--out_dir={tmp_path / 'out'}")
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr  # one line, no traceback


def test_prepare_1gb_bounded_memory(tmp_path):
    """1 GB of text through the char pipeline: peak RSS of the whole process tree < 1 GB."""
    src, out = tmp_path / "big.txt", tmp_path / "out"
    block = ("The quick brown fox jumps over the lazy dog, 0123456789 times.\n" * 16384).encode()
    copies = (1 << 30) // len(block) + 1
    try:
        with open(src, "wb") as f:
            for _ in range(copies):
                f.write(block)
        # a fresh parent, so RUSAGE_CHILDREN covers only prepare.py and its workers
        probe = ("import resource, subprocess, sys; "
                 "r = subprocess.run(sys.argv[1:]); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
        r = run("-c", probe, sys.executable, "data/text/prepare.py", f"--input={src}",
                "--encoding=char", f"--out_dir={out}", "--num_proc=2")
        peak_kb, rc = map(int, r.stdout.split()[-2:])
        assert rc == 0, r.stderr
        print(f"1 GB prepare: peak RSS {peak_kb / 1024:.0f} MB")
        assert peak_kb < 1 << 20, f"peak RSS {peak_kb / 1024:.0f} MB"
        assert "MB/s" in r.stderr
        meta = load_meta(out)
        assert meta["train_tokens"] + meta["val_tokens"] == copies * len(block)
        assert os.path.getsize(out / "train.bin") == 2 * meta["train_tokens"]
    finally:
        shutil.rmtree(tmp_path)  # pytest keeps old tmp dirs; don't leave 3 GB behind


# ----------------------------------------------------------------------------------------
# shakespeare and openwebtext


def nanogpt_char_reference(text):
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * 0.9)
    return [np.array([stoi[c] for c in part], dtype=np.uint16) for part in (text[:n], text[n:])]


def test_shakespeare_char(tmp_path):
    shutil.copy(SHAKESPEARE, tmp_path / "input.txt")
    r = run("data/shakespeare_char/prepare.py", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path)
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (1003854, 111540, 65)
    train_ref, val_ref = nanogpt_char_reference(open(SHAKESPEARE).read())
    assert (tmp_path / "train.bin").read_bytes() == train_ref.tobytes()
    assert (tmp_path / "val.bin").read_bytes() == val_ref.tobytes()
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode("ROMEO:\nO, she doth")) == "ROMEO:\nO, she doth"


def test_shakespeare_gpt2(tmp_path):
    shutil.copy(SHAKESPEARE, tmp_path / "input.txt")
    r = run("data/shakespeare/prepare.py", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path)
    assert (meta["train_tokens"], meta["val_tokens"], meta["dtype"]) == (301966, 36059, "uint16")
    text = open(SHAKESPEARE).read()
    tok = load_tokenizer(tmp_path)
    assert tok.decode(read_split(tmp_path, "train").tolist()) == text[:int(len(text) * 0.9)]


def test_shakespeare_offline_error(tmp_path):
    # port 9 (discard) on localhost refuses at once: the download fails as it would offline
    r = run("data/shakespeare_char/prepare.py", f"--out_dir={tmp_path}",
            "--url=http://127.0.0.1:9/input.txt")
    assert r.returncode == 1
    assert r.stderr.startswith("error: could not download") and r.stderr.count("\n") == 1
    assert str(tmp_path / "input.txt") in r.stderr
    assert not os.path.exists(tmp_path / "input.txt")


def test_openwebtext_prepare_and_resume(tmp_path):
    import datasets
    owt = load_module("data/openwebtext/prepare.py", "owt_prepare")
    docs = [f"Document {i}: " + "ünï words " * (i % 13) for i in range(2500)]
    ds = datasets.Dataset.from_dict({"text": docs})
    full = owt.prepare(ds, tmp_path / "full", num_proc=2, num_shards=6)

    part = tmp_path / "part"
    assert owt.prepare(ds, part, num_proc=1, num_shards=6, max_shards=2) is None  # "killed"
    assert not (part / "train.bin").exists() and (part / "train.bin.partial").exists()
    with open(part / "train.bin.partial", "ab") as f:
        f.write(b"\x07\x00\x09")  # a shard cut short mid-write
    assert owt.prepare(ds, part, num_proc=1, num_shards=6) == full
    for split in ("train", "val"):
        assert (part / f"{split}.bin").read_bytes() == (tmp_path / "full" / f"{split}.bin").read_bytes()

    tok = load_tokenizer(tmp_path / "full")
    texts = tok.decode(read_split(tmp_path / "full", "train").tolist()).split(EOT)
    texts += tok.decode(read_split(tmp_path / "full", "val").tolist()).split(EOT)
    assert sorted(t for t in texts if t) == sorted(docs) and full["val"] > 0


# ----------------------------------------------------------------------------------------
# tokenizers and metadata


def test_tokenizers_by_name_and_default(tmp_path):
    gpt2 = get_tokenizer("gpt2")
    assert (gpt2.vocab_size, gpt2.eot_token, gpt2.name) == (50257, 50256, "gpt2")
    assert load_tokenizer(tmp_path).name == "gpt2"  # a dir without meta
    assert gpt2.encode(EOT) != [gpt2.eot_token]  # literal text stays text
    for bad in ("no_such_encoding", "char"):
        with pytest.raises(DataError, match=bad):
            get_tokenizer(bad)
    with pytest.raises(DataError, match="50300"):
        gpt2.decode([50300])


def test_char_tokenizer_unknown_character():
    tok = CharTokenizer(list("abc\n"))
    assert tok.decode(tok.encode("cab\n")) == "cab\n"
    for text, ch in (("abz", "'z'"), ("ab日", "'日'"), ("a🙂", "U+1F642")):
        with pytest.raises(DataError, match=re.escape(ch)):
            tok.encode(text)


def write_split_files(d, train, val, meta=None, dtype=np.uint16):
    os.makedirs(d, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(os.path.join(d, "train.bin"))
    np.asarray(val, dtype=dtype).tofile(os.path.join(d, "val.bin"))
    if meta is not None:
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f)


def test_nanogpt_meta_pkl(tmp_path):
    chars = sorted(set("hello world\n"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    write_split_files(tmp_path, [1, 2, 3] * 20, [3, 2, 1] * 20)
    assert load_meta(tmp_path)["chars"] == chars
    tok = load_tokenizer(tmp_path)
    assert tok.name == "char" and tok.decode(tok.encode("hello world\n")) == "hello world\n"
    splits, _ = open_dataset(tmp_path, block_size=8)
    assert len(splits["train"]) == 60


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_meta_pkl_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 5, "itos": _Exploit(marker)}, f)
    with pytest.raises(DataError, match="meta.pkl"):
        load_meta(tmp_path)
    with pytest.raises(DataError, match="meta.pkl"):
        load_tokenizer(tmp_path)
    assert not marker.exists()


def test_validation_errors(tmp_path):
    ok = {"encoding": "gpt2", "vocab_size": 50, "dtype": "uint16"}

    def expect(d, needle, **kw):
        with pytest.raises(DataError) as e:
            open_dataset(d, **{"block_size": 8, **kw})
        assert needle in str(e.value), str(e.value)

    write_split_files(tmp_path / "ids", [1, 2, 60] * 10, [1] * 30, ok)
    expect(tmp_path / "ids", "train.bin: token id 60 >= vocab_size 50")
    write_split_files(tmp_path / "model", [1, 2, 40] * 10, [1] * 30, ok)
    expect(tmp_path / "model", "set --vocab_size to at least 41", vocab_size=32)
    write_split_files(tmp_path / "short", [1] * 30, [1] * 8, ok)
    expect(tmp_path / "short", "val.bin: 8 tokens is shorter than block_size + 1")
    write_split_files(tmp_path / "dtype", [1] * 31, [1] * 30, {**ok, "dtype": "uint32"})
    expect(tmp_path / "dtype", "train.bin: 62 bytes is not a whole number of uint32")
    write_split_files(tmp_path / "count", [1] * 32, [1] * 30, {**ok, "train_tokens": 64})
    expect(tmp_path / "count", "train.bin: 32 uint16 tokens but meta.json says 64")
    write_split_files(tmp_path / "missing", [1] * 30, [1] * 30, ok)
    os.remove(tmp_path / "missing" / "val.bin")
    expect(tmp_path / "missing", "val.bin not found")
    expect(tmp_path / "nowhere", "nowhere not found")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "meta.json").write_text("{not json")
    expect(tmp_path / "json", "meta.json: not valid JSON")


# ----------------------------------------------------------------------------------------
# batches


@pytest.fixture
def counting_data(tmp_path):
    """Token i is i, so a row's first token is its window's start."""
    path = tmp_path / "train.bin"
    np.arange(8 * 50 + 4, dtype=np.uint16).tofile(path)  # 50 windows of block_size 8
    return TokenFile(str(path), np.uint16)


def epoch_starts(loaders_by_index, steps):
    """Per step, the window starts of the global batch, micro-batches in index order."""
    out = []
    for step in range(steps):
        rows = []
        for index, loader in loaders_by_index:
            x, y = loader.get(step, index)
            assert torch.equal(x[:, 1:], y[:, :-1])
            rows += x[:, 0].tolist()
        out.append(rows)
    return out


def test_epoch_sampling(counting_data):
    make = lambda **kw: BatchLoader(counting_data, 8, 3, seed=5, micro_steps_per_step=4,
                                    sampling="epoch", **kw)
    one = make()
    single = epoch_starts([(i, one) for i in range(4)], steps=9)  # 108 samples: 2+ epochs
    ranks = [make(rank_first_index=2 * r, rank_num_micro=2) for r in range(2)]
    double = epoch_starts([(2 * r + m, ranks[r]) for r in range(2) for m in range(2)], steps=9)
    assert single == double  # world-size invariant

    samples = [s for step in single for s in step]
    windows = list(range(0, 400, 8))
    assert sorted(samples[:50]) == windows and sorted(samples[50:100]) == windows
    assert samples[:50] != samples[50:100]  # each epoch has its own order
    rank_samples = [set(), set()]
    for step in range(4):  # the 48 samples of steps 0-3 are all in epoch 0
        for r in range(2):
            for m in range(2):
                rank_samples[r] |= set(ranks[r].get(step, 2 * r + m)[0][:, 0].tolist())
    assert not rank_samples[0] & rank_samples[1] and len(rank_samples[0] | rank_samples[1]) == 48

    resumed = make()
    resumed.load_state_dict(one.state_dict(4))
    assert epoch_starts([(i, resumed) for i in range(4)], steps=9)[4:] == single[4:]
    for loader in [one, resumed, *ranks]:
        loader.close()


def test_loader_state_checks(counting_data):
    epoch = BatchLoader(counting_data, 8, 3, 5, 4, sampling="epoch", prefetch=False)
    state = epoch.state_dict(7)
    assert state["epoch"] == 7 * 12 // 50 and state["sampling"] == "epoch"
    json.dumps(state)  # plain data for the checkpoint
    with pytest.raises(DataError, match="sampling"):
        BatchLoader(counting_data, 8, 3, 5, 4, prefetch=False).load_state_dict(state)
    with pytest.raises(DataError, match="samples_per_step"):
        BatchLoader(counting_data, 8, 6, 5, 4, "epoch", prefetch=False).load_state_dict(state)
    with pytest.raises(DataError, match="random, epoch"):
        BatchLoader(counting_data, 8, 3, 5, 4, sampling="sequential")


def test_random_sampling_is_deterministic_and_prefetch_neutral(counting_data):
    with_prefetch = BatchLoader(counting_data, 8, 4, seed=1, micro_steps_per_step=2)
    without = BatchLoader(counting_data, 8, 4, seed=1, micro_steps_per_step=2, prefetch=False)
    for step in range(5):
        for index in (0, 1):
            a, b = with_prefetch.get(step, index), without.get(step, index)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            ref = get_batch(counting_data, 8, 4, 1, step, index)
            assert torch.equal(a[0], ref[0]) and a[0].is_contiguous() and a[1].is_contiguous()
    assert not torch.equal(get_batch(counting_data, 8, 4, 1, 0, 0)[0],
                           get_batch(counting_data, 8, 4, 1, 0, 1)[0])
    x, _ = with_prefetch.get(3, 0)  # out of order: read on the spot, same answer
    assert torch.equal(x, without.get(3, 0)[0])
    assert with_prefetch.wait_time > 0
    with_prefetch.close()
    without.close()


def rss_mb():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def test_2gb_train_bin_flat_rss(tmp_path):
    """1000 batches spread over a 2 GB train.bin leave resident memory flat (a memmap would
    keep every touched page: 64k windows here, >= 256 MB)."""
    train = tmp_path / "train.bin"
    num_tokens = 1 << 30
    rng = np.random.default_rng(0)
    with open(train, "wb") as f:
        f.truncate(2 * num_tokens)  # sparse: quick to make, reads back as zeros
        for offset in rng.integers(0, 2 * num_tokens - (1 << 20), 16):
            f.seek(int(offset) & ~1)
            f.write(rng.integers(0, 50257, 1 << 19, dtype=np.uint16).tobytes())
    np.ones(4096, dtype=np.uint16).tofile(tmp_path / "val.bin")
    try:
        splits, _ = open_dataset(tmp_path, block_size=1024, vocab_size=50304)
        loader = BatchLoader(splits["train"], 1024, 64, seed=0, micro_steps_per_step=1)
        loader.get(0, 0)
        before = rss_mb()
        for step in range(1, 1001):
            x, y = loader.get(step, 0)
        growth = rss_mb() - before
        print(f"2 GB train.bin: RSS {before:.0f} MB -> +{growth:.1f} MB after 1000 batches")
        assert growth < 100
        loader.close()
    finally:
        os.remove(train)


# ----------------------------------------------------------------------------------------
# training on a uint32 dataset


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "train.py")),
                    reason="train.py is not written yet")
def test_cl100k_dataset_trains(tmp_path):
    (tmp_path / "in.txt").write_text("A few words to train on, over and over.\n" * 200)
    data = tmp_path / "data"
    r = run("data/text/prepare.py", f"--input={tmp_path / 'in.txt'}", "--encoding=cl100k_base",
            f"--out_dir={data}", "--num_proc=1")
    assert r.returncode == 0, r.stderr
    r = run("train.py", f"--data_dir={data}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", "--max_iters=3", "--eval_interval=2",
            "--eval_iters=1", "--gradient_accumulation_steps=1", "--vocab_size=100352",
            f"--out_dir={tmp_path / 'out'}",
            "--device=cpu", "--compile=False")
    assert r.returncode == 0, r.stdout + r.stderr
    losses = [float(v) for v in re.findall(r"loss[ =:]+([-+0-9.eE]+|nan|inf)", r.stdout + r.stderr)]
    assert losses and all(math.isfinite(v) for v in losses), r.stdout


def test_bpe_checkpoint_samples_without_its_data_dir(tmp_path):
    # the checkpoint embeds tokenizer.json, so sample.py decodes after the data dir is gone
    text = "To be, or not to be, that is the question. Whether tis nobler in the mind.\n" * 100
    (tmp_path / "in.txt").write_text(text)
    data, out = tmp_path / "data", tmp_path / "out"
    r = run("data/text/prepare.py", f"--input={tmp_path / 'in.txt'}", "--encoding=bpe:300",
            f"--out_dir={data}", "--num_proc=1")
    assert r.returncode == 0, r.stderr
    r = run("train.py", f"--data_dir={data}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=8", "--max_iters=40", "--eval_interval=20",
            "--eval_iters=2", "--gradient_accumulation_steps=1", "--learning_rate=1e-2",
            f"--out_dir={out}", "--device=cpu", "--compile=False")
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(data)
    r = run("sample.py", f"--out_dir={out}", "--start=To be", "--num_samples=1",
            "--max_new_tokens=30", "--temperature=0", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("To be") and len(r.stdout) > len("To be") + 10
    assert set(r.stdout) <= set(text) | {"-"}
