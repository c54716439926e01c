"""The small prepare scripts (shakespeare, openwebtext), tokenizers and their fingerprints,
metadata and batch loading. data/text/prepare.py is tested in test_dataprep.py. The 2 GB
train.bin test is in the slow tier."""
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

from gpt_trainer.dataloader import (BatchLoader, DataError, TokenFile, check_same_tokenizer, get_batch,
                                    load_meta, open_dataset)
from gpt_trainer.tokenizer import CharTokenizer, get_tokenizer, load_tokenizer, tokenizer_from_meta
from trainutil import corpus_text, need_tiktoken, one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = "<|endoftext|>"


def run(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_split(data_dir, split):
    meta = load_meta(data_dir)
    return np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"])


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------
# shakespeare and openwebtext


def nanogpt_char_reference(text):
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * 0.9)
    return [np.array([stoi[c] for c in part], dtype=np.uint16) for part in (text[:n], text[n:])]


def write_input(tmp_path):
    """input.txt: tinyshakespeare when ../shared has it, else trainutil's generated text."""
    text = corpus_text()
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    return text


def test_shakespeare_char(tmp_path):
    text = write_input(tmp_path)
    r = run("data/shakespeare_char/prepare.py", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path)
    train_ref, val_ref = nanogpt_char_reference(text)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train_ref), len(val_ref))
    assert meta["vocab_size"] == len(set(text)) and meta["tokenizer_fingerprint"].startswith("sha256:")
    assert (tmp_path / "train.bin").read_bytes() == train_ref.tobytes()
    assert (tmp_path / "val.bin").read_bytes() == val_ref.tobytes()
    tok = load_tokenizer(tmp_path)
    sample = text[1000:1100]
    assert tok.decode(tok.encode(sample)) == sample


def test_shakespeare_gpt2(tmp_path):
    need_tiktoken("gpt2")
    text = write_input(tmp_path)
    r = run("data/shakespeare/prepare.py", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path)
    tok = load_tokenizer(tmp_path)
    n = int(len(text) * 0.9)  # nanoGPT: the two parts encoded separately, no end-of-text
    train, val = read_split(tmp_path, "train"), read_split(tmp_path, "val")
    assert train.tolist() == tok.encode(text[:n]) and val.tolist() == tok.encode(text[n:])
    assert (meta["train_tokens"], meta["val_tokens"], meta["dtype"]) == (len(train), len(val), "uint16")


def test_shakespeare_offline_error(tmp_path):
    # port 9 (discard) on localhost refuses at once: the download fails as it would offline
    r = run("data/shakespeare_char/prepare.py", f"--out_dir={tmp_path}",
            "--url=http://127.0.0.1:9/input.txt")
    assert r.returncode == 1
    notice, error = r.stderr.splitlines()  # what it tried, then the one error line
    assert notice.startswith("downloading http://127.0.0.1:9/input.txt")
    assert error.startswith("error: could not download") and str(tmp_path / "input.txt") in error
    assert not os.path.exists(tmp_path / "input.txt")


def test_openwebtext_prepare_and_resume(tmp_path):
    need_tiktoken("gpt2")
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
    assert sorted(os.listdir(part)) == [".lock", "meta.json", "train.bin", "val.bin"]  # committed, no leftovers
    for split in ("train", "val"):
        assert (part / f"{split}.bin").read_bytes() == (tmp_path / "full" / f"{split}.bin").read_bytes()

    tok = load_tokenizer(tmp_path / "full")
    texts = tok.decode(read_split(tmp_path / "full", "train").tolist()).split(EOT)
    texts += tok.decode(read_split(tmp_path / "full", "val").tolist()).split(EOT)
    assert sorted(t for t in texts if t) == sorted(docs) and full["val"] > 0


# ----------------------------------------------------------------------------------------
# tokenizers and metadata


def test_tokenizers_by_name_and_default(tmp_path):
    need_tiktoken("gpt2")
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


_text_prepare = None


def prepare_text(tmp_path, name, text, encoding):
    """A data dir made by data/text/prepare.py (in this process) from one text file."""
    global _text_prepare
    _text_prepare = _text_prepare or load_module("data/text/prepare.py", "text_prepare")
    (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    _text_prepare.main([f"--input={tmp_path / name}.txt", f"--encoding={encoding}",
                        f"--out_dir={tmp_path / name}", "--num_proc=1"])
    return tmp_path / name


@pytest.fixture
def two_bpe_dirs(tmp_path):
    """Two bpe:300 data dirs from different text: same vocab size, different tokenizers."""
    text = corpus_text()
    a = prepare_text(tmp_path, "a", text[:60_000], "bpe:300")
    b = prepare_text(tmp_path, "b", text[60_000:][::-1][:60_000], "bpe:300")
    assert load_meta(a)["vocab_size"] == load_meta(b)["vocab_size"] == 300
    return a, b


def test_tokenizer_file_must_match_meta(two_bpe_dirs):
    """A tokenizer.json that is not the one meta.json was written with (what a failed
    re-prepare used to leave) is refused by the loader and by the tokenizer."""
    a, b = two_bpe_dirs
    _, meta = open_dataset(a, block_size=8)
    assert meta["tokenizer_json"] == (a / "tokenizer.json").read_text()  # checkpoints embed it
    shutil.copy(b / "tokenizer.json", a / "tokenizer.json")
    with pytest.raises(DataError, match=r"a/tokenizer.json \(sha256:\w+\.\.\.\) is not the tokenizer "
                                        r"meta.json was written with"):
        open_dataset(a, block_size=8)
    with pytest.raises(DataError, match=r"is not the one .*a/meta.json was written with"):
        load_tokenizer(a)


def test_tokenizer_smaller_than_meta_is_refused(two_bpe_dirs, tmp_path):
    """An older meta.json (no fingerprint) beside a tokenizer.json of another size, and a
    checkpoint whose embedded tokenizer disagrees with its vocab_size: sample.py used to decode
    with it; now it is a one-line error."""
    a, _ = two_bpe_dirs
    small = prepare_text(tmp_path, "small", "abab abab cdcd\n" * 20, "bpe:300")
    meta = {k: v for k, v in load_meta(a).items() if k != "tokenizer_fingerprint"}
    shutil.copy(small / "tokenizer.json", a / "tokenizer.json")
    smaller = load_meta(small)["vocab_size"]
    with pytest.raises(DataError, match=f"has {smaller} tokens but .*a/meta.json says vocab_size 300"):
        tokenizer_from_meta(meta, str(a))
    from gpt_trainer import loading
    ckpt = {"meta": {**meta, "tokenizer_json": (small / "tokenizer.json").read_text()}, "config": {}}
    with pytest.raises(DataError, match=f"has {smaller} tokens but the checkpoint's meta says vocab_size 300"):
        loading.checkpoint_tokenizer(ckpt)


def test_check_same_tokenizer(two_bpe_dirs):
    a, b = two_bpe_dirs
    ma, mb = open_dataset(a, block_size=8)[1], open_dataset(b, block_size=8)[1]
    check_same_tokenizer(ma, dict(ma), "out/ckpt.pt", str(a))
    check_same_tokenizer(None, ma, "out/ckpt.pt")  # nanoGPT's checkpoints record no meta
    old = {k: v for k, v in ma.items() if k != "tokenizer_fingerprint"}  # embedded json only
    check_same_tokenizer(old, ma, "out/ckpt.pt")
    with pytest.raises(DataError, match=r"b's tokenizer \(bpe, 300 tokens, sha256:\w+\.\.\.\) is not the "
                                        r"one out/ckpt.pt was trained with \(bpe, 300 tokens"):
        check_same_tokenizer(ma, mb, "out/ckpt.pt", str(b))
    abc = {"encoding": "char", "chars": list("abc\n"), "vocab_size": 4}
    abd = {"encoding": "char", "chars": list("abd\n"), "vocab_size": 4}
    check_same_tokenizer(abc, dict(abc), "ckpt.pt")
    with pytest.raises(DataError, match="char, 4 tokens"):
        check_same_tokenizer(abc, abd, "ckpt.pt")
    check_same_tokenizer({}, {"encoding": "gpt2", "vocab_size": 50257}, "ckpt.pt")  # no meta: gpt2


@pytest.mark.slow
def test_resume_refuses_a_dataset_with_another_tokenizer(tmp_path):
    """train.py resumed on data with another vocabulary of the same size stops with one line."""
    from trainutil import run_train, write_char_dataset
    a = write_char_dataset(str(tmp_path / "a"), "abcdefgh\n" * 300)
    b = write_char_dataset(str(tmp_path / "b"), "abcdefgz\n" * 300)
    out = str(tmp_path / "out")
    run_train(out, a, max_iters=2, block_size=8)
    p = run_train(out, b, max_iters=4, block_size=8, init_from="resume", check=False)
    assert p.returncode == 1
    line = one_error_line(p.stderr)
    assert re.search(r"b's tokenizer \(char, 9 tokens, sha256:\w+\.\.\.\) is not the one .*ckpt.pt was "
                     r"trained with \(char, 9 tokens", line), line
    assert run_train(out, a, max_iters=4, block_size=8, init_from="resume", check=False).returncode == 0


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_cl100k_dataset_trains(tmp_path):
    need_tiktoken("cl100k_base")
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
    # an untrained model predicts close to uniformly over its vocabulary
    assert abs(losses[0] - math.log(100352)) < 0.1, (losses[0], r.stdout)


@pytest.mark.slow
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
