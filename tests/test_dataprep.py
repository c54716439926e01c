"""data/text/prepare.py, corpus.py and dataprep.py: corpora as they come (directories with --ext and
globs, compressed files, JSON lines and arrays, parquet, Hugging Face datasets, nested
fields, bad text), the document split, bounded memory, resume, progress, and a data dir that
changes all at once (interrupted or failed prepares leave the old one intact)."""
import bz2
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from gpt_trainer import corpus
from gpt_trainer import dataprep
from gpt_trainer.dataloader import DataError, load_meta, open_dataset
from test_dataloader import ROOT, EOT, load_module, nanogpt_char_reference, read_split, run
from gpt_trainer.tokenizer import CharTokenizer, load_tokenizer
from trainutil import corpus_text, need_tiktoken, one_error_line

PREPARE = "data/text/prepare.py"
tp = load_module(PREPARE, "text_prepare")


def prepare(*args, out, num_proc=1):
    """data/text/prepare.py in this process (a DataError propagates); returns meta.json."""
    tp.main([*map(str, args), f"--out_dir={out}", f"--num_proc={num_proc}"])
    return load_meta(out)


def decoded(out):
    tok = load_tokenizer(out)
    return [tok.decode(read_split(out, s).tolist()) for s in ("train", "val")]


def joined(docs, encoding):
    """The documents as prepare writes them: eot after each, or for char a newline."""
    if encoding == "char":
        return "".join(d if d.endswith("\n") else d + "\n" for d in docs)
    return "".join(d + EOT for d in docs)


def assert_split_of(docs, out, encoding):
    """train.bin holds the documents not in val and val.bin the others, each in input order,
    as many in val as meta.json says (found by trying every choice: independent of how
    prepare picks them). Returns the val documents' indices."""
    train, val = decoded(out)
    k = load_meta(out)["source"]["documents"]["val"]
    for chosen in itertools.combinations(range(len(docs)), k):
        rest = [d for i, d in enumerate(docs) if i not in chosen]
        if val == joined([docs[i] for i in chosen], encoding) and train == joined(rest, encoding):
            return chosen
    pytest.fail(f"train/val are not a split of the documents into whole ones:\n{train!r}\n{val!r}")


# ----------------------------------------------------------------------------------------
# round trips


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
    if encoding in ("gpt2", "cl100k_base"):
        need_tiktoken(encoding)
    docs = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    r = run(PREPARE, f"--input={tmp_path / 'in'}", f"--encoding={encoding}", f"--out_dir={out}",
            "--num_proc=2", "--val_fraction=0.25")
    assert r.returncode == 0, r.stderr
    meta = load_meta(out)
    assert meta["source"]["documents"] == {"train": 3, "val": 1, "skipped": 0, "empty": 2}
    assert_split_of(docs, out, encoding)
    train, val = read_split(out, "train"), read_split(out, "val")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert max(train.max(), val.max()) < meta["vocab_size"] == load_tokenizer(out).vocab_size
    if encoding != "char":
        assert load_tokenizer(out).eot_token == meta["eot_token"]
        assert (train == meta["eot_token"]).sum() == 3 and (val == meta["eot_token"]).sum() == 1
    if encoding.startswith("bpe"):
        assert meta["vocab_size"] == 300 and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("encoding,dtype,itemsize", [("gpt2", "uint16", 2),
                                                      ("cl100k_base", "uint32", 4)])
def test_token_dtype(tmp_path, encoding, dtype, itemsize):
    need_tiktoken(encoding)
    (tmp_path / "in.txt").write_text("some text to encode\n" * 50)
    meta = prepare(f"--input={tmp_path / 'in.txt'}", f"--encoding={encoding}", out=tmp_path / "out")
    assert meta["dtype"] == dtype
    assert os.path.getsize(tmp_path / "out" / "train.bin") == itemsize * meta["train_tokens"]
    if encoding == "cl100k_base":
        assert read_split(tmp_path / "out", "val").max() > 65535  # eot 100257 needs uint32


def test_single_document_is_cut_like_nanogpt(tmp_path):
    """One document: train gets its first 90% of characters, val the rest, exactly as
    nanoGPT's shakespeare_char (the corpus ends with a newline, so char adds none)."""
    text = corpus_text()
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    meta = prepare(f"--input={tmp_path / 'input.txt'}", "--encoding=char", out=tmp_path / "out")
    train_ref, val_ref = nanogpt_char_reference(text)
    assert (tmp_path / "out" / "train.bin").read_bytes() == train_ref.tobytes()
    assert (tmp_path / "out" / "val.bin").read_bytes() == val_ref.tobytes()
    assert meta["source"]["split"] == {"by": "characters", "train_characters": int(len(text) * 0.9),
                                       "characters": len(text)}


def test_chunking_at_line_boundaries(tmp_path):
    """Tiny chunks: pieces cut at line ends (or inside a too-long line at a character
    boundary) give back the file exactly, and char tokens equal whole-file encoding."""
    text = "short\n" + "ü日🙂x" * 50 + "\nlines\n" * 30 + "tail without newline"
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    args = tp.parse_args([f"--input={path}", "--val_fraction=0.3", "--encoding=char"])
    args.chunk_bytes = 16
    sources = tp.find_inputs(args)
    scan = tp.scan_inputs(sources, args)
    cut = int(len(text) * 0.7)
    segments = list(tp.corpus_segments(sources, args, scan, None, cut))
    assert len(segments) > 20 and "".join(t for _, t, _, _ in segments) == text
    assert [end for _, _, end, _ in segments] == [False] * (len(segments) - 1) + [True]
    assert "".join(t for split, t, _, _ in segments if split == "val") == text[cut:]
    tok = CharTokenizer(sorted(set(text + "\n")))
    chunked = tok.encode_segments([(t, end) for _, t, end, _ in segments])
    assert chunked.tolist() == tok.encode(text + "\n")


# ----------------------------------------------------------------------------------------
# which files, which formats


def test_ext_globs_and_explicit_files(tmp_path):
    src = tmp_path / "src"
    files = {"a.PY": "print(1)\n", "sub/b.md": "# b\n", "sub/c.py": "c = 3\n", "d.TXT": "d\n",
             "e.txt.gz": None, "notes.log": "log\n", ".git/x.py": "hidden\n", "README": "readme\n"}
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gz"):
            (src / name).write_bytes(gzip.compress(b"e\n"))
        else:
            (src / name).write_text(text)

    def inputs(*args):
        meta = prepare(*args, "--encoding=char", out=tmp_path / "out")
        return [os.path.relpath(i["path"], src) for i in meta["source"]["inputs"]]

    assert inputs(f"--input={src}", "--ext=py,.MD") == ["a.PY", "sub/b.md", "sub/c.py"]  # any case, no hidden dirs
    assert inputs(f"--input={src}") == ["d.TXT", "e.txt.gz"]  # default txt,jsonl, compressed too
    assert inputs(f"--input={src}", "--ext=*.LOG,sub/*") == ["notes.log", "sub/b.md", "sub/c.py"]
    assert inputs(f"--input={src / 'README'}", f"--input={src / 'notes.log'}") == ["README", "notes.log"]
    assert inputs(f"--input={src}/sub/*.py", f"--input={src}/*.PY") == ["sub/c.py", "a.PY"]
    with pytest.raises(DataError, match=r"no files matching --ext=rst"):
        prepare(f"--input={src}", "--ext=rst", "--encoding=char", out=tmp_path / "out")


def test_compressed_inputs(tmp_path):
    docs = [f"document {i}: ünïcödé 🙂\nsecond line {i}\n" for i in range(8)]
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs[4:]).encode()
    import zstandard
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.txt.gz").write_bytes(gzip.compress(docs[0].encode()))
    (tmp_path / "in/b.txt.xz").write_bytes(lzma.compress(docs[1].encode()))
    (tmp_path / "in/c.TXT.BZ2").write_bytes(bz2.compress(docs[2].encode()))
    (tmp_path / "in/d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[3].encode()))
    (tmp_path / "in/e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    prepare(f"--input={tmp_path / 'in'}", "--encoding=char", "--val_fraction=0.25", out=tmp_path / "out")
    assert_split_of(docs, tmp_path / "out", "char")
    # a bad byte inside a compressed file is reported at its offset in the decompressed data
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(b"x" * 1000 + b"\xff"))
    with pytest.raises(DataError, match=r"bad.txt.gz: byte 1,000: not valid UTF-8"):
        prepare(f"--input={tmp_path / 'bad.txt.gz'}", "--encoding=char", out=tmp_path / "out2")


def test_json_parquet_and_hf_datasets(tmp_path):
    import datasets
    docs = [f"doc {i}: text with ünïcödé\nand a second line" for i in range(12)]
    rows = [{"meta": {"body": d, "n": i}, "id": i} for i, d in enumerate(docs)]
    json.dump(rows[:3], open(tmp_path / "a.json", "w"))
    json.dump(rows[3], open(tmp_path / "b.json", "w"))  # one object: one document
    datasets.Dataset.from_list(rows[4:7]).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list(rows[7:9]).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[9:12]),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dict"))
    inputs = [f"--input={tmp_path / n}" for n in ("a.json", "b.json", "c.parquet", "saved", "dict")]
    meta = prepare(*inputs, "--text_field=meta.body", "--encoding=char", "--val_fraction=0.2",
                   out=tmp_path / "out")
    assert [i["documents"] for i in meta["source"]["inputs"]] == [3, 1, 3, 2, 3]
    assert meta["source"]["inputs"][3]["rows"] == 2 and meta["source"]["inputs"][3]["split"] == "train"
    assert_split_of(docs, tmp_path / "out", "char")
    with pytest.raises(DataError, match=r"a.json: element 0: byte 1: no string field 'meta.text'"):
        prepare(f"--input={tmp_path / 'a.json'}", "--text_field=meta.text", "--encoding=char", out=tmp_path / "out")
    with pytest.raises(DataError, match=r"c.parquet: no column 'body' \(it has meta, id\); set --text_field$"):
        prepare(f"--input={tmp_path / 'c.parquet'}", "--text_field=body", "--encoding=char", out=tmp_path / "out")
    with pytest.raises(DataError, match=r"no split 'validation' \(it has train, test\)"):
        prepare(f"--input={tmp_path / 'dict'}", "--hf_split=validation", "--encoding=char", out=tmp_path / "out")


def test_hub_dataset_offline_is_one_line(tmp_path):
    """hf:NAME goes through datasets.load_dataset; offline it is one error line naming it."""
    r = run(PREPARE, "--input=hf:no-such-user/no-such-dataset", "--encoding=char", f"--out_dir={tmp_path}",
            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 1
    assert "hf:no-such-user/no-such-dataset: cannot load the dataset" in one_error_line(r.stderr)


# ----------------------------------------------------------------------------------------
# bad input


def write_bad_corpus(root):
    """Three good documents and, in other files, bad ones; returns (good docs, bad files)."""
    root.mkdir()
    (root / "a.txt").write_text("good text\n")
    (root / "b.txt").write_bytes(b"x" * 87 + b"\xff rest\n")  # in-file offset 87, not stream's
    (root / "c.txt").write_bytes(b"ok\n" * 10 + b"\xc3(\n")
    (root / "d.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "lone \\ud800 here"}\n'
                                   b'{"text": "bad \xfe byte"}\n{"text": "ok again"}\n')
    return ["good text\n", "fine", "ok again"]


def test_errors_strict_lists_every_bad_file(tmp_path):
    write_bad_corpus(tmp_path / "in")
    r = run(PREPARE, f"--input={tmp_path / 'in'}", "--encoding=char", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        "error: 3 inputs have bad documents (--errors=skip leaves them out, --errors=replace puts "
        "U+FFFD in place of bad text):",
        f"  {tmp_path}/in/b.txt: byte 87: not valid UTF-8 (byte 0xff)",
        f"  {tmp_path}/in/c.txt: byte 30: not valid UTF-8 (byte 0xc3)",
        f"  {tmp_path}/in/d.jsonl:2: byte 17: lone surrogate U+D800 in the text (and 1 more bad "
        f"document(s) in it)"]
    assert not (tmp_path / "out").exists()  # nothing written


def test_errors_skip_and_replace(tmp_path):
    good = write_bad_corpus(tmp_path / "in")
    r = run(PREPARE, f"--input={tmp_path / 'in'}", "--encoding=char", "--errors=skip",
            f"--out_dir={tmp_path / 'skip'}")
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("skipped: ")]) == 3
    meta = load_meta(tmp_path / "skip")
    assert meta["source"]["documents"]["skipped"] == 4
    assert [i.get("skipped", 0) for i in meta["source"]["inputs"]] == [0, 1, 1, 2]
    assert_split_of(good, tmp_path / "skip", "char")

    r = run(PREPARE, f"--input={tmp_path / 'in'}", "--encoding=char", "--errors=replace",
            f"--out_dir={tmp_path / 'replace'}")
    assert r.returncode == 0, r.stderr
    assert "replaced 4 undecodable byte sequence(s) or lone surrogate(s)" in r.stderr
    assert load_meta(tmp_path / "replace")["source"]["replaced"] == 4
    docs = ["good text\n", "x" * 87 + "\ufffd rest\n", "ok\n" * 10 + "\ufffd(\n", "fine",
            "lone \ufffd here", "bad \ufffd byte", "ok again"]
    assert_split_of(docs, tmp_path / "replace", "char")


@pytest.mark.parametrize("encoding", ["char", "gpt2", "bpe:260"])
def test_lone_surrogates_same_for_every_encoding(tmp_path, encoding):
    if encoding == "gpt2":
        need_tiktoken("gpt2")
    (tmp_path / "s.jsonl").write_text('{"text": "before"}\n{"text": "a \\udc80 b \\ud83d\\ude00"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: byte 19: lone surrogate U\+DC80"):
        prepare(f"--input={tmp_path / 's.jsonl'}", f"--encoding={encoding}", out=tmp_path / "out")
    prepare(f"--input={tmp_path / 's.jsonl'}", f"--encoding={encoding}", "--errors=replace",
            out=tmp_path / "out")
    assert_split_of(["before", "a \ufffd b \U0001F600"], tmp_path / "out", encoding)


# ----------------------------------------------------------------------------------------
# memory, split, vocabulary, meta


@pytest.mark.slow
def test_jsonl_record_larger_than_a_chunk_is_streamed(tmp_path, monkeypatch):
    """A record of ~30 MB read with 1 MB chunks: Python allocates a few chunks, not the record
    (tracemalloc counts allocations, so the bound does not depend on speed)."""
    monkeypatch.setattr(tp, "CHUNK_BYTES", 1 << 20)
    big = "Ünïcödé text \\ \" 🙂\n" * (1 << 19)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"other": "x" * (8 << 20), "meta": {"id": 1, "text": big}, "z": [1, 2]}) + "\n")
        f.write(json.dumps({"meta": {"text": "small"}}) + "\n")
    size = os.path.getsize(path)
    args = tp.parse_args([f"--input={path}", "--text_field=meta.text", "--encoding=char"])
    sources = tp.find_inputs(args)
    tracemalloc.start()
    try:
        scan = tp.scan_inputs(sources, args)
        train, val, pieces = hashlib.sha256(), "", 0
        for split, text, _, _ in tp.corpus_segments(sources, args, scan, np.array([False, True]), None):
            if split == "train":
                train.update(text.encode())
            else:
                val += text
            pieces += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{size / 2**20:.0f} MiB record: {pieces} pieces, tracemalloc peak {peak / 2**20:.1f} MiB")
    assert scan["docs"] == [2] and pieces > 20 and val == "small"
    assert train.hexdigest() == hashlib.sha256(big.encode()).hexdigest()
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB record"


@pytest.mark.slow
def test_jsonl_large_records_bounded_rss(tmp_path):
    """3 records of 100 MB (JSON escapes and all) through the whole gpt2 pipeline: the
    largest process of the tree stays far below one record's size in Python objects."""
    need_tiktoken("gpt2")
    src = tmp_path / "big.jsonl"
    line = "The quick brown fox \"jumps\" over the lazy dög.\n"
    with open(src, "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": i, "text": line * ((100 << 20) // len(line))}) + "\n")
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    r = run("-c", probe, sys.executable, PREPARE, f"--input={src}", f"--out_dir={tmp_path / 'out'}",
            "--num_proc=2")
    peak_kb, rc = map(int, r.stdout.split()[-2:])
    assert rc == 0, r.stderr
    print(f"3 x 100 MB records: peak RSS {peak_kb / 1024:.0f} MiB")
    assert peak_kb < 600 << 10, f"peak RSS {peak_kb / 1024:.0f} MiB"
    assert load_meta(tmp_path / "out")["source"]["documents"]["train"] == 2


def test_val_split_by_documents(tmp_path):
    docs = [f"document number {i:03d} says hello\n" for i in range(200)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def val_ids(seed, out):
        meta = prepare(f"--input={tmp_path / 'd.jsonl'}", "--encoding=char", f"--seed={seed}",
                       out=tmp_path / out)
        assert meta["source"]["split"] == {"by": "documents", "val_documents": 20}
        assert meta["source"]["options"]["seed"] == seed
        train, val = decoded(tmp_path / out)
        ids = [int(m) for m in re.findall(r"number (\d+)", val)]
        assert val == "".join(docs[i] for i in ids) and ids == sorted(ids)  # whole, in order
        assert train == "".join(d for i, d in enumerate(docs) if i not in ids)
        return ids

    a, b, again = val_ids(1337, "a"), val_ids(7, "b"), val_ids(1337, "again")
    assert len(a) == 20 and a == again and a != b
    assert a != list(range(180, 200)) and max(a) - min(a) > 100  # spread, not the tail
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "again" / "val.bin").read_bytes()


def test_bpe_that_cannot_be_reached_says_so(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("abab abab cdcd\n" * 20)
    meta = prepare(f"--input={tmp_path / 't.txt'}", "--encoding=bpe:5000", out=tmp_path / "out")
    err = capsys.readouterr().err
    assert meta["vocab_size"] < 300 and meta["source"]["options"]["encoding"] == "bpe:5000"
    assert (f"bpe:5000 cannot be reached: the train split has no more pairs to merge after "
            f"{meta['vocab_size']} tokens, so the vocabulary has {meta['vocab_size']}") in err


def test_meta_records_inputs_documents_and_options(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"{i}.txt").write_text(f"doc {i}\n")
    (tmp_path / "in" / "empty.txt").write_text("")
    meta = prepare(f"--input={tmp_path / 'in'}", "--encoding=char", "--val_fraction=0.4",
                   "--seed=3", out=tmp_path / "out")
    src = meta["source"]
    names = sorted(os.listdir(tmp_path / "in"))
    assert [i["path"] for i in src["inputs"]] == [str(tmp_path / "in" / n) for n in names]
    for entry, name in zip(src["inputs"], names):
        st = os.stat(tmp_path / "in" / name)
        assert (entry["size"], entry["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        assert entry["documents"] == (0 if name == "empty.txt" else 1)
    assert src["documents"] == {"train": 3, "val": 2, "skipped": 0, "empty": 1}
    assert src["options"] == {"encoding": "char", "val_fraction": 0.4, "seed": 3, "text_field": "text",
                              "errors": "strict", "ext": ["txt", "jsonl"], "hf_split": "train"}
    json.dumps(meta)  # plain data: it goes into every checkpoint


# ----------------------------------------------------------------------------------------
# progress, resume, interruption and the data dir as a whole


def test_progress_in_every_phase(tmp_path, monkeypatch):
    bars = []
    real = dataprep.progress

    def recording(desc, *args, **kwargs):
        bars.append(desc)
        return real(desc, *args, **kwargs)

    monkeypatch.setattr(dataprep, "progress", recording)
    monkeypatch.setattr(corpus, "progress", recording)
    (tmp_path / "t.txt").write_text(corpus_text()[:20000])
    for encoding in ("char", "bpe:300"):
        prepare(f"--input={tmp_path / 't.txt'}", f"--encoding={encoding}", out=tmp_path / encoding)
    assert bars == ["reading inputs", "collecting characters", "encoding (char)",
                    "reading inputs", "bpe:300: reading the train split",
                    "bpe:300: computing merges", "encoding (bpe)"]


def test_progress_off_a_terminal_is_whole_lines(monkeypatch):
    out = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", out)
    bar = dataprep.progress("encoding (gpt2)", 3000, delay=0, mininterval=0)
    for _ in range(3):
        bar.update(1000)
    bar.close()
    lines = out.getvalue().split("\n")
    assert "\r" not in out.getvalue() and lines[-1] == "" and len(lines) >= 3
    assert re.fullmatch(r"encoding \(gpt2\): 100%\|#+\| 3\.00k/3\.00k \[.*B/s\]", lines[-2]), lines


real_encode_chunks = dataprep.encode_chunks


def counting_encode_chunks(counter, stop_after=None):
    """encode_chunks that counts the chunks it encodes, and stops like Ctrl-C after
    stop_after of them."""
    def encode_chunks(*args):
        for item in real_encode_chunks(*args):
            if counter[0] == stop_after:
                raise KeyboardInterrupt("SIGINT")
            counter[0] += 1
            yield item
    return encode_chunks


@pytest.mark.parametrize("encoding", ["char", "bpe:300"])
def test_resume_continues_an_interrupted_prepare(tmp_path, monkeypatch, capsys, encoding):
    (tmp_path / "t.txt").write_text(corpus_text()[:200_000])
    monkeypatch.setattr(tp, "CHUNK_BYTES", 8192)
    args = [f"--input={tmp_path / 't.txt'}", f"--encoding={encoding}"]
    total = [0]
    monkeypatch.setattr(dataprep, "encode_chunks", counting_encode_chunks(total))
    prepare(*args, out=tmp_path / "fresh")
    assert total[0] > 12
    monkeypatch.setattr(dataprep, "encode_chunks", counting_encode_chunks([0], stop_after=5))
    with pytest.raises(DataError, match=r"interrupted \(SIGINT\); its progress is kept"):
        prepare(*args, "--resume", out=tmp_path / "resumed")
    state = json.load(open(tmp_path / "resumed" / dataprep.PROGRESS))["state"]
    assert state["encoded"]["chunks"] == 5 and not (tmp_path / "resumed" / "meta.json").exists()
    with pytest.raises(DataError, match=r"pass --resume to continue it"):
        prepare(*args, out=tmp_path / "resumed")  # forgetting --resume must not throw it away
    monkeypatch.setattr(dataprep, "encode_chunks", counting_encode_chunks([0], stop_after=4))
    with pytest.raises(DataError, match="interrupted"):
        prepare(*args, "--resume", out=tmp_path / "resumed")  # a second interruption: 5 + 4
    assert json.load(open(tmp_path / "resumed" / dataprep.PROGRESS))["state"]["encoded"]["chunks"] == 9

    def no_second_scan_or_training(*a, **k):
        raise AssertionError("a resume redoes neither the scan nor the vocabulary")
    monkeypatch.setattr(tp, "scan_inputs", no_second_scan_or_training)
    monkeypatch.setattr(tp, "fit_bpe", no_second_scan_or_training)
    monkeypatch.setattr(tp, "collect_chars", no_second_scan_or_training)
    rest = [0]
    monkeypatch.setattr(dataprep, "encode_chunks", counting_encode_chunks(rest))
    capsys.readouterr()
    prepare(*args, "--resume", out=tmp_path / "resumed")
    assert "resuming from" in capsys.readouterr().err
    assert rest[0] == total[0] - 9
    assert sorted(os.listdir(tmp_path / "resumed")) == sorted(os.listdir(tmp_path / "fresh"))
    for name in set(os.listdir(tmp_path / "fresh")) - {".lock"}:  # the lock names its last holder
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def _square_unless_7(x):
    if x == 7:
        raise ValueError("seven")
    return x * x


def test_imap_bounded_order_and_errors():
    assert list(dataprep.imap_bounded(_square_unless_7, range(7), 3)) == [x * x for x in range(7)]
    results = dataprep.imap_bounded(_square_unless_7, range(20), 2)
    assert [next(results) for _ in range(7)] == [x * x for x in range(7)]
    with pytest.raises(ValueError, match="seven"):  # a worker's exception, raised in order
        next(results)


def file_hashes(d):
    """sha256 of each file of a data dir but its .lock (which names its last holder)."""
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in sorted(os.listdir(d)) if n != ".lock"}


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-group", "sigterm-to-the-parent"])
def test_interrupted_prepare_leaves_the_old_dir(tmp_path, sig, group):
    """A bpe re-prepare into a prepared dir, stopped by Ctrl-C (SIGINT to the whole process
    group, as a terminal sends it) or SIGTERM to the parent alone, while it is encoding:
    one error line, no traceback from the parent or its workers, no .partial files, and
    the old tokenizer, bins and meta as they were."""
    out = tmp_path / "out"
    (tmp_path / "old.txt").write_text(corpus_text()[:100_000])
    prepare(f"--input={tmp_path / 'old.txt'}", "--encoding=bpe:300", out=out)
    before = file_hashes(out)
    with open(tmp_path / "new.txt", "w") as f:  # long enough to be mid-encoding when stopped
        f.write((corpus_text()[:1_000_000] + "\n") * 4)
    p = subprocess.Popen([sys.executable, PREPARE, f"--input={tmp_path / 'new.txt'}", "--encoding=bpe:400",
                          f"--out_dir={out}", "--num_proc=2"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "train.bin.partial").exists():  # the encoding pass has begun
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.01)
    assert (out / "tokenizer.json.partial").exists()  # the new tokenizer, not yet in place
    if group:
        os.killpg(p.pid, sig)
    else:
        os.kill(p.pid, sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    lines = err.splitlines()
    assert lines[-1] == f"error: interrupted ({sig.name}); {out} is unchanged", err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Error" not in err.replace("error: ", "")
    assert file_hashes(out) == before  # no .partial left, nothing replaced
    open_dataset(out, block_size=8)
    load_tokenizer(out)


def test_failed_commit_is_detected(tmp_path, monkeypatch):
    """If a prepare dies after renaming the new token files but before meta.json (meta is
    written last), the dir is refused, never read with the old meta."""
    (tmp_path / "a.txt").write_text(corpus_text()[:50_000])
    (tmp_path / "b.txt").write_text(corpus_text()[50_000:90_000])
    out = tmp_path / "out"
    prepare(f"--input={tmp_path / 'a.txt'}", "--encoding=bpe:300", out=out)

    def no_meta(path, obj):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(dataprep, "write_json", no_meta)
    with pytest.raises(DataError, match="no space left on device"):
        prepare(f"--input={tmp_path / 'b.txt'}", "--encoding=bpe:300", out=out)
    with pytest.raises(DataError, match="tokenizer.json .* is not the tokenizer meta.json was written with"):
        open_dataset(out, block_size=8)
    os.remove(out / "tokenizer.json")
    shutil.copy(tmp_path / "a.txt", tmp_path / "c.txt")
    monkeypatch.undo()
    meta = prepare(f"--input={tmp_path / 'c.txt'}", "--encoding=char", out=out)  # a clean re-prepare
    assert not (out / "tokenizer.json").exists() and "tokenizer_file" not in meta
    open_dataset(out, block_size=8)


def readme_prepare_commands():
    """The data/text/prepare.py command lines of README.md's Data section."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("### Data\n", 1)[1].split("\n### ", 1)[0]
    return [line.strip() for line in section.splitlines()
            if line.strip().startswith("python data/text/prepare.py --input")]


def test_readme_data_commands(tmp_path, monkeypatch):
    """Each data/text/prepare.py command README's Data section shows, run as written (in a
    dir holding the inputs it names), except the hub one: offline, it is tested above."""
    import datasets
    import shlex
    import zstandard
    for path, text in {"my_texts/a.txt": corpus_text()[:30_000], "src/a.py": "x = 1\n",
                       "src/doc/B.MD": "# b\n", "src/c.rst": "c\n", "src/skip.txt": "no\n",
                       "logs/2024/x.log": "log line\n", "notes.TXT": "notes\n",
                       "big/a.txt": "good\n", "big/b.txt": "more\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    (tmp_path / "big/bad.txt").write_bytes(b"\xff")
    (tmp_path / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "z"}\n'))
    datasets.Dataset.from_list([{"meta": {"body": f"doc {i}"}} for i in range(3)]).to_parquet(
        str(tmp_path / "docs.parquet"))
    monkeypatch.chdir(tmp_path)
    commands = readme_prepare_commands()
    assert len(commands) >= 5
    for command in commands:
        argv = shlex.split(command, comments=True)[2:]
        if any(a.startswith("--input=hf:") for a in argv):
            continue
        encoding = ([a.split("=", 1)[1] for a in argv if a.startswith("--encoding=")] or ["gpt2"])[0]
        if encoding != "char" and not encoding.startswith("bpe:"):
            need_tiktoken(encoding)
        args = tp.parse_args(argv)
        tp.main(argv + ["--num_proc=1"])
        meta = load_meta(args.out_dir)
        assert meta["source"]["options"] == tp.options(args), command
        assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0, command


# ----------------------------------------------------------------------------------------
# the CLI's own errors


def test_text_prepare_errors(tmp_path):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"ok\n\xff\xfe\n")
    no_field = tmp_path / "x.jsonl"
    no_field.write_text('{"body": "hi"}\n')
    cases = [
        ([f"--input={tmp_path / 'missing.txt'}"], "missing.txt: no such file"),
        ([f"--input={bad_utf8}"], "bad.txt: byte 3: not valid UTF-8 (byte 0xff)"),
        ([f"--input={no_field}"], "x.jsonl:1: byte 0: no string field 'text'"),
        ([f"--input={bad_utf8}", "--encoding=no_such_encoding"], "no_such_encoding"),
        ([f"--input={no_field}", "--val_fraction=1.5"], "val_fraction"),
        ([f"--input={no_field}", "--encoding=bpe:abc"], "bpe:abc"),
        ([f"--input={no_field}", "--encoding=bpe:100"], "bpe:N with N >= 257"),
        ([f"--input={no_field}", "--errors=ignore"], "--errors: invalid choice"),
        (["--bogus=1"], "--bogus"),
    ]
    for args, needle in cases:
        if not any(a.startswith("--encoding") for a in args):
            args = [*args, "--encoding=char"]  # gpt2 needs tiktoken's download
        r = run(PREPARE, *args, f"--out_dir={tmp_path / 'out'}")
        assert r.returncode == 1, (args, r.stderr)
        assert needle in one_error_line(r.stderr), (needle, r.stderr)


@pytest.mark.slow
def test_prepare_1gb_bounded_memory(tmp_path):
    """1 GB of text through the char pipeline: peak RSS of the largest process < 1 GB."""
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
        r = run("-c", probe, sys.executable, PREPARE, f"--input={src}",
                "--encoding=char", f"--out_dir={out}", "--num_proc=2")
        peak_kb, rc = map(int, r.stdout.split()[-2:])
        assert rc == 0, r.stderr
        print(f"1 GB prepare: peak RSS {peak_kb / 1024:.0f} MB")
        assert peak_kb < 1 << 20, f"peak RSS {peak_kb / 1024:.0f} MB"
        assert re.search(r"encoding \(char\): .*MB/s", r.stderr)  # progress off a terminal
        meta = load_meta(out)
        assert meta["train_tokens"] + meta["val_tokens"] == copies * len(block)
        assert os.path.getsize(out / "train.bin") == 2 * meta["train_tokens"]
    finally:
        shutil.rmtree(tmp_path)  # pytest keeps old tmp dirs; don't leave 3 GB behind


@pytest.mark.parametrize("script", ["data/text/prepare.py", "data/chat/prepare.py"])
def test_prepare_scripts_share_their_argument_checks(script):
    """Both prepare scripts check the shared options the same way, before reading any input:
    bpe:N below 257 (the byte tokens and <|endoftext|>) is one DataError line in each."""
    import importlib.util
    from gpt_trainer.errors import DataError
    spec = importlib.util.spec_from_file_location("prepare_under_test", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(DataError, match=r"--encoding=bpe:100: too small"):
        module.parse_args(["--input=missing.jsonl", "--encoding=bpe:100"])
    with pytest.raises(DataError, match=r"--val_fraction=1.0 must be between 0 and 1"):
        module.parse_args(["--input=missing.jsonl", "--val_fraction=1.0"])
    args = module.parse_args(["a.jsonl", "--input=b", "--encoding=bpe:300", "--ext=JSONL, txt"])
    assert args.input == ["b", "a.jsonl"] and args.bpe_vocab == 300 and args.ext == ["jsonl", "txt"]
