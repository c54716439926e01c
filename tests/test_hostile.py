"""
Hostile and careless use, and faults (issue 23): inputs that are cut short or damaged, two
writers on one directory, signals at awkward moments, settings that make no sense, and files
that are not what they claim. Every case ends in one clear line and a non-zero exit, or is
read to its end; nothing already saved is lost or changed.
"""
import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import subprocess
import sys

import pytest

from gpt_trainer import dirlock
from gpt_trainer.dataloader import load_meta
from gpt_trainer.errors import DataError
from test_dataloader import ROOT, run
from test_dataprep import PREPARE, decoded, prepare
from trainutil import char_data, kill_tree, one_error_line  # noqa: F401 (a fixture)


def last_error_line(stderr):
    """The error line that ends stderr (progress or notes may come before it), no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


@pytest.fixture(autouse=True)
def release_locks():
    """In-process writers release their locks; a failed one may not have: start clean."""
    yield
    dirlock.unlock_all()


# ----------------------------------------------------------------------------------------
# compressed and columnar inputs: read to their end, or refused (never a short document)

LINES = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(6000))


def compress(kind, data):
    if kind == "zst":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    return {"gz": gzip.compress, "xz": lzma.compress, "bz2": bz2.compress}[kind](data)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("kind", ["gz", "xz", "bz2", "zst"])
def test_damaged_compressed_input_is_refused_or_skipped(tmp_path, kind, damage):
    """A compressed file cut short (`head -c`) or not compressed at all: --errors=strict stops
    naming it; --errors=skip leaves all of it out and counts it; never a short document."""
    good = "a good document\n"
    (tmp_path / "good.txt").write_text(good)
    blob = compress(kind, LINES.encode())
    blob = blob[:len(blob) // 2] if damage == "truncated" else b"this is not compressed data\n" * 50
    bad = tmp_path / f"bad.txt.{kind}"
    bad.write_bytes(blob)
    inputs = [f"--input={tmp_path / 'good.txt'}", f"--input={bad}"]
    with pytest.raises(DataError, match=rf"bad.txt.{kind}: byte [\d,]+: truncated or corrupt {kind} data"):
        prepare(*inputs, "--encoding=char", out=tmp_path / "strict")
    assert not (tmp_path / "strict").exists()
    meta = prepare(*inputs, "--encoding=char", "--errors=skip", out=tmp_path / "skip")
    assert meta["source"]["documents"]["skipped"] == 1
    assert [i.get("skipped", 0) for i in meta["source"]["inputs"]] == [0, "all"]
    assert "".join(decoded(tmp_path / "skip")) == good  # nothing of the damaged file


def test_truncated_jsonl_zst_beside_another_input(tmp_path):
    """The issue's case: a .jsonl.zst cut by `head -c` used to count 0 documents in silence."""
    import zstandard
    records = "".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(3000)).encode()
    blob = zstandard.ZstdCompressor().compress(records)
    (tmp_path / "t.jsonl.zst").write_bytes(blob[:len(blob) // 3])
    (tmp_path / "other.txt").write_text("another input\n")
    r = run(PREPARE, f"--input={tmp_path / 't.jsonl.zst'}", f"--input={tmp_path / 'other.txt'}",
            "--encoding=char", f"--out_dir={tmp_path / 'out'}", "--num_proc=1")
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "t.jsonl.zst" in line and "truncated or corrupt zst data" in line and "--errors=skip" in line


def test_every_zstd_frame_is_read(tmp_path):
    """A .zst of several frames (pzstd, zstd of concatenated parts) is read to its end, not
    to the end of its first frame."""
    parts = [LINES[:50_000], LINES[50_000:]]
    (tmp_path / "two.txt.zst").write_bytes(b"".join(compress("zst", p.encode()) for p in parts))
    prepare(f"--input={tmp_path / 'two.txt.zst'}", "--encoding=char", out=tmp_path / "out")
    assert "".join(decoded(tmp_path / "out")) == LINES


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_parquet_is_refused_or_skipped(tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"row {i} text" for i in range(2000)]}), buf, row_group_size=200)
    blob = buf.getvalue()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(blob[:len(blob) // 2] if damage == "truncated" else b"PAR1" + b"\x00garbage" * 100)
    (tmp_path / "good.txt").write_text("a good document\n")
    inputs = [f"--input={bad}", f"--input={tmp_path / 'good.txt'}"]
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file"):
        prepare(*inputs, "--encoding=char", out=tmp_path / "strict")
    meta = prepare(*inputs, "--encoding=char", "--errors=skip", out=tmp_path / "skip")
    assert [i.get("skipped", 0) for i in meta["source"]["inputs"]] == ["all", 0]
    assert "".join(decoded(tmp_path / "skip")) == "a good document\n"


def test_damaged_gzip_is_one_line_from_the_cli(tmp_path):
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(LINES.encode())[:3000])
    for errors in ("strict", "skip"):
        r = run(PREPARE, f"--input={tmp_path / 't.txt.gz'}", "--encoding=char", f"--errors={errors}",
                f"--out_dir={tmp_path / errors}", "--num_proc=1")
        assert r.returncode == 1  # with skip, nothing is left: no documents
        line = last_error_line(r.stderr)
        assert ("t.txt.gz" in line) if errors == "strict" else "no documents" in line, r.stderr
        if errors == "skip":
            assert "skipped: " in r.stderr and "t.txt.gz" in r.stderr


# ----------------------------------------------------------------------------------------
# one writer per data dir

HOLD_DATA_DIR = """
import sys, time
sys.path.insert(0, {repo!r})
from gpt_trainer import dataprep
dataprep.lock_data_dir({out!r})
print("locked", flush=True)
time.sleep(600)
"""


def test_second_prepare_on_a_busy_data_dir_stops_at_once(tmp_path):
    (tmp_path / "a.txt").write_text(LINES)
    out = tmp_path / "out"
    prepare(f"--input={tmp_path / 'a.txt'}", "--encoding=char", out=out)
    before = {n: (out / n).read_bytes() for n in ("train.bin", "val.bin", "meta.json")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_DATA_DIR.format(repo=ROOT, out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / "b.txt").write_text("other text\n" * 100)
        with pytest.raises(DataError, match=rf"{out} is in use by another prepare \(pid {holder.pid} on "):
            prepare(f"--input={tmp_path / 'b.txt'}", "--encoding=char", out=out)
        assert {n: (out / n).read_bytes() for n in before} == before
    finally:
        kill_tree(holder)  # kill -9: the kernel drops the lock
    prepare(f"--input={tmp_path / 'b.txt'}", "--encoding=char", out=out)
    assert "".join(decoded(out)) == "other text\n" * 100


@pytest.mark.parametrize("case", ["file", "under_a_file"])
def test_prepare_out_dir_that_cannot_be_a_directory(tmp_path, case):
    (tmp_path / "a.txt").write_text(LINES)
    (tmp_path / "f").write_text("mine")
    out = tmp_path / "f" if case == "file" else tmp_path / "f" / "sub"
    r = run(PREPARE, f"--input={tmp_path / 'a.txt'}", "--encoding=char", f"--out_dir={out}", "--num_proc=1")
    assert r.returncode == 1
    assert "out_dir" in one_error_line(r.stderr) and str(out) in r.stderr
    assert (tmp_path / "f").read_text() == "mine"


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = [{prepare!r}] + sys.argv[1:]
sys.path.insert(0, {repo!r})
from configurator import install_error_hook
install_error_hook()
import runpy
runpy.run_path({prepare!r}, run_name="__main__")
"""


@pytest.mark.parametrize("resume", [False, True])
def test_prepare_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, resume):
    """Writes fail part way (RLIMIT_FSIZE: EFBIG, as a full disk fails with ENOSPC): one line,
    no temp or .partial file left (with --resume: the .partial files and a valid progress
    record, no empty temp file), and the old data dir as it was."""
    (tmp_path / "a.txt").write_text(LINES)
    out = tmp_path / "out"
    prepare(f"--input={tmp_path / 'a.txt'}", "--encoding=char", out=out)
    before = {n: (out / n).read_bytes() for n in ("train.bin", "val.bin", "meta.json")}
    (tmp_path / "big.txt").write_text(LINES * 40)  # ~2.4 MB: its train.bin passes the limit
    script = FULL_DISK.format(limit=1 << 20, prepare=os.path.join(ROOT, PREPARE), repo=ROOT)
    r = run("-c", script, f"--input={tmp_path / 'big.txt'}", "--encoding=char", f"--out_dir={out}",
            "--num_proc=1", *(["--resume"] if resume else []))
    assert r.returncode == 1
    line = last_error_line(r.stderr)
    assert "file too large" in line, line
    assert {n: (out / n).read_bytes() for n in before} == before
    left = sorted(n for n in os.listdir(out) if n not in before and n != ".lock")
    if resume:
        assert left == ["prepare.progress.json", "train.bin.partial", "val.bin.partial"], left
        json.loads((out / "prepare.progress.json").read_text())
    else:
        assert left == [], left


# ----------------------------------------------------------------------------------------
# train.py: every setting checked before anything is created, deleted or downloaded

IN_ONE_PROCESS = """
import json, os, runpy, sys
sys.path.insert(0, {repo!r})
os.chdir({repo!r})
from configurator import UserError
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = [{script!r}, *argv]
    try:
        runpy.run_path({script!r}, run_name="__main__")
        results.append(["ok", ""])
    except UserError as e:
        results.append(["error", str(e)])
    except BaseException as e:  # a bug: the CLI would print a traceback
        results.append(["bug", f"{{type(e).__name__}}: {{e}}"])
    sys.stdout.flush()
print("RESULTS " + json.dumps(results))
"""


def run_cases(script, cases, env=None):
    """[(status, message)] of running `script` (train.py, evaluate.py, ...) with each argv in
    cases, all in one process (imports once): 'error' is a UserError (the CLI's one line),
    'bug' any other exception (the CLI's traceback)."""
    from trainutil import child_env
    env = child_env(**(env or {}))
    r = subprocess.run([sys.executable, "-c", IN_ONE_PROCESS.format(repo=ROOT, script=script), json.dumps(cases)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


def tiny(out, data, **overrides):
    from trainutil import train_args
    return train_args(str(out), str(data), **overrides)


# train.py cases that stop before training (or after a few steps), in one process; name:
# (overrides, what the error says); an out_dir per case (setup in train_runs)
SETTINGS_CASES = {
    "init_from=gpt2-foo": (dict(init_from="gpt2-foo"), "init_from='gpt2-foo' is not valid"),
    "missing data dir": (dict(data_dir="nodata"), "nodata not found"),
    "learning_rate=1e999": (dict(learning_rate="1e999"), "learning_rate=inf is not valid"),
    "min_lr > learning_rate": (dict(min_lr=1e-2, learning_rate=1e-3), "min_lr=0.01 is above learning_rate"),
    "warmup past decay": (dict(warmup_iters=100, lr_decay_iters=10), "warmup_iters=100 is past lr_decay_iters=10"),
    "huge seed": (dict(seed=99999999999999999999), "seed=99999999999999999999 is not valid"),
    "config not utf-8": (dict(_config="latin1.py"), "latin1.py: not UTF-8"),
}


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory, char_data):
    """{case: (status, message, out_dir)} of every train.py case below, run in one process."""
    import torch
    from test_checkpoint import nanogpt_checkpoint, our_checkpoint
    root = tmp_path_factory.mktemp("train_cases")
    (root / "latin1.py").write_bytes(b"learning_rate = 1e-3  # caf\xe9\n")
    argvs = {}
    for name, (overrides, _) in SETTINGS_CASES.items():
        overrides = dict(overrides)
        config = [str(root / overrides.pop("_config"))] if "_config" in overrides else []
        data = str(root / overrides.pop("data_dir")) if "data_dir" in overrides else char_data
        argvs[name] = (config + tiny(root / name.replace(" ", "_"), data, **overrides), root / name.replace(" ", "_"))
    # --overwrite=True over an earlier run, eval_tasks=hellaswag whose file is missing and offline
    (root / "overwrite").mkdir()
    (root / "overwrite" / "ckpt.pt").write_bytes(b"an earlier run's checkpoint")
    (root / "overwrite" / "metrics.jsonl").write_text('{"iter": 0, "loss": 4.0}\n')
    argvs["overwrite"] = (tiny(root / "overwrite", char_data, overwrite=True, eval_tasks="hellaswag",
                               hellaswag_path=str(root / "hs" / "hellaswag_val.jsonl")), root / "overwrite")
    # learning_rate=1e30 overflows the weights: every step after the first is non-finite
    argvs["big lr"] = (tiny(root / "big_lr", char_data, learning_rate=1e30, max_iters=4, max_bad_steps=5),
                       root / "big_lr")
    # a checkpoint holding a NaN weight
    (root / "nan").mkdir()
    ckpt, path, _, _ = our_checkpoint(root / "nan")
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(ckpt, path)
    argvs["nan ckpt"] = (tiny(root / "nan", char_data, init_from="resume"), root / "nan")
    # nanoGPT's checkpoint (no 'mlp' in its model_args) resumed with --mlp=gelu_exact
    (root / "nano").mkdir()
    torch.save(nanogpt_checkpoint(vocab_size=load_meta(char_data)["vocab_size"])[0], root / "nano" / "ckpt.pt")
    argvs["nanogpt mlp"] = (tiny(root / "nano", char_data, init_from="resume", mlp="gelu_exact", bias=False,
                                 max_iters=4), root / "nano")
    before = {name: {f: (d / f).read_bytes() for f in os.listdir(d)} if d.exists() else None
              for name, (_, d) in argvs.items()}
    # no network here in any case; a proxy that refuses makes a download fail at once
    results = run_cases("train.py", [argv for argv, _ in argvs.values()],
                        env=dict(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9"))
    return {name: (status, message, d, before[name]) for (name, (_, d)), (status, message) in zip(argvs.items(), results)}


@pytest.mark.parametrize("case", list(SETTINGS_CASES))
def test_train_settings_that_make_no_sense_stop_before_anything_is_written(train_runs, case):
    """Each is one error line naming the setting, and out_dir is not even created."""
    status, message, out, _ = train_runs[case]
    assert status == "error" and SETTINGS_CASES[case][1] in message, (status, message)
    assert not out.exists(), "out_dir was created"


def test_no_checkpoint_is_deleted_before_the_tasks_are_there(train_runs):
    """--overwrite=True --eval_tasks=hellaswag offline without the file: the download fails
    before anything in out_dir is touched (it used to delete ckpt.pt first)."""
    status, message, out, before = train_runs["overwrite"]
    assert status == "error" and "could not download" in message, message
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # not even a .lock


def test_nan_runs_and_nan_checkpoints_end_non_zero(train_runs):
    """A run whose last steps were all skipped as non-finite ends with an error naming the last
    checkpoint, not exit 0; resuming a checkpoint with a NaN weight is refused before anything
    is written, the checkpoint unchanged."""
    status, message, _, _ = train_runs["big lr"]
    assert status == "error" and "non-finite step(s) in a row" in message, message
    assert "no checkpoint has been written" in message
    status, message, out, before = train_runs["nan ckpt"]
    assert status == "error" and "weight transformer.h.0.mlp.c_fc.weight holds NaN/inf" in message, message
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f != ".lock"} == before  # its own lock


def test_resume_override_of_a_key_nanogpt_lacks_is_never_ignored(train_runs):
    """nanoGPT's model_args have no mlp: --mlp=gelu_exact on a resume of its checkpoint is
    either applied (the saved model_args say gelu_exact) or refused in one line."""
    import torch
    status, message, out, _ = train_runs["nanogpt mlp"]
    if status == "error":
        assert "mlp" in message and "gelu_exact" in message, message
    else:
        assert status == "ok", message
        saved = torch.load(out / "ckpt.pt", weights_only=True)  # nanoGPT's model_args kept, the GELU beside them
        assert saved["gpt_config"]["mlp"] == "gelu_exact" and "mlp" not in saved["model_args"]


# ----------------------------------------------------------------------------------------
# a stop signal is honoured within seconds wherever the run is


def fake_hellaswag(path, n):
    """n HellaSwag-shaped examples in characters a char model of tinyshakespeare can spell."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"ctx": f"The king spoke to his lord of {'abcdefghij'[i % 10]} things and then",
                                "endings": ["he went away.", "she sang a song.", "they ate bread.", "all slept."],
                                "label": i % 4}) + "\n")
    return path


def same_tensors(a, b):
    import torch
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("where", ["eval", "tasks", "step"])
def test_sigterm_is_honoured_within_seconds(tmp_path, char_data, where):
    """SIGTERM in a long evaluation (it used to keep evaluating for 10 minutes), in task
    scoring, or in a step of many micro-steps: exit 0 within seconds with a checkpoint of
    the iteration it was in, from which a resume ends bitwise where an uninterrupted run does."""
    import time
    from trainutil import load_ckpt, popen_train, run_train, wait_for
    import re
    long = {"eval": dict(eval_iters=10**7),
            "tasks": dict(eval_tasks="hellaswag", hellaswag_path=fake_hellaswag(tmp_path / "hs.jsonl", 30_000))}
    # "step": 200 micro-steps (~1-2 s a step), dropout on: the RNG of a cut step must not leak
    settings = dict(eval_iters=2, max_iters=2, lr_decay_iters=2, warmup_iters=1,
                    **(dict(gradient_accumulation_steps=200, dropout=0.1) if where == "step" else {}))
    out = tmp_path / "out"
    with open(tmp_path / "log.txt", "w") as log:
        proc = popen_train(str(out), char_data, log=log, **dict(settings, **long.get(where, {})))
        try:
            wait_for(lambda: "parameters" in (tmp_path / "log.txt").read_text(), 120, proc)
            time.sleep(1.5)  # well inside the long part
            t0 = time.monotonic()
            proc.terminate()
            rc = proc.wait(timeout=60)
            took = time.monotonic() - t0
        finally:
            kill_tree(proc)
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    assert took < 10, f"{took:.1f} s from SIGTERM to exit"
    m = re.search(r"stopped (during the evaluation of|in the middle of) iter (\d+)", text)
    assert m, text[-3000:]
    assert load_ckpt(str(out))["iter_num"] == int(m.group(2))
    if where != "step":
        assert m.group(2) == "0"
    run_train(str(out), char_data, init_from="resume", **settings)
    run_train(str(tmp_path / "straight"), char_data, **settings)
    same_tensors(load_ckpt(str(out))["model"], load_ckpt(str(tmp_path / "straight"))["model"])


# ----------------------------------------------------------------------------------------
# evaluate.py, sample.py, hf.py: nonsense refused in one line, before the work


@pytest.fixture
def char_ckpt(tmp_path, char_data):
    """out_dir/ckpt.pt of a random tiny GPT over char_data, as train.py writes one."""
    import torch
    from dataclasses import asdict
    from model import GPT, GPTConfig
    meta = load_meta(char_data)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=meta["vocab_size"]))
    out = tmp_path / "ckpt_out"
    out.mkdir()
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), "iter_num": 0,
                "meta": meta, "config": {"data_dir": str(char_data)}}, out / "ckpt.pt")
    return out


def test_evaluate_settings_that_make_no_sense(tmp_path, char_data, char_ckpt):
    from trainutil import write_char_dataset
    other = write_char_dataset(str(tmp_path / "other"), "abc def\n" * 500)  # another vocabulary
    (tmp_path / "adir").mkdir()
    base = [f"--out_dir={char_ckpt}", "--device=cpu", "--eval_iters=2", "--batch_size=2"]
    cases = [
        (["--eval_iters=0"], "eval_iters=0 is not valid"),
        (["--batch_size=0"], "batch_size=0 is not valid"),
        (["--max_examples=-1"], "max_examples=-1 is not valid"),
        (["--tasks="], "tasks='' is not valid"),
        ([f"--results={tmp_path / 'adir'}"], "results="),
        ([f"--results={tmp_path / 'nodir' / 'r.json'}"], "results="),
        ([f"--data_dir={other}", "--tasks=val"], "its val loss would mean nothing"),
        (["--tasks=val", f"--results={tmp_path / 'r.json'}"], ""),  # and the sane case works
    ]
    results = run_cases("evaluate.py", [base + argv for argv, _ in cases])
    for (argv, needle), (status, message) in zip(cases, results):
        assert (status, needle in message) == (("error", True) if needle else ("ok", True)), (argv, status, message)
    assert json.loads((tmp_path / "r.json").read_text())["val_loss"] > 0


def test_hellaswag_files_that_lie(tmp_path):
    from gpt_trainer import evaluation as evaluate
    good = {"ctx": "a b", "endings": ["c", "d"], "label": 1}
    (tmp_path / "bool.jsonl").write_text(json.dumps(dict(good, label=True)) + "\n")
    with pytest.raises(DataError, match="bool.jsonl line 1: needs a ctx string"):
        evaluate.load_hellaswag(str(tmp_path / "bool.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(good).encode().replace(b"a b", b"caf\xe9"))
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 \(byte 0xe9"):
        evaluate.load_hellaswag(str(tmp_path / "latin1.jsonl"))


def test_tied_endings_are_not_a_right_answer():
    """Endings with the same loss (here identical) cannot be told apart: no credit for label 0."""
    import torch
    from gpt_trainer import evaluation as evaluate
    from model import GPT, GPTConfig
    from gpt_trainer.tokenizer import CharTokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=8))
    tok = CharTokenizer(list(" abcdefg"))
    encoded, _ = evaluate.encode_examples([{"ctx": "abc", "endings": ["", ""], "label": 0},
                                           {"ctx": "abc", "endings": ["de", "de"], "label": 1}], tok, 32)
    scores = evaluate.score_multiple_choice(model, encoded, 4, contextlib.nullcontext(), "cpu")
    assert scores == {"acc": 0.0, "acc_norm": 0.0, "n": 2}


def tiny_llama(path, **config):
    import transformers
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=64, **config)).save_pretrained(path)
    return path


def test_hf_directories_that_lie(tmp_path):
    """Each is an HFError (one line), never a traceback or a silent cast."""
    import shutil
    import torch
    import transformers
    from gpt_trainer.errors import HFError
    from gpt_trainer.hf import gpt_from_hf
    from safetensors.torch import load_file, save_file
    llama = tiny_llama(tmp_path / "llama")
    heads = shutil.copytree(llama, tmp_path / "heads5")
    config = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps(dict(config, num_attention_heads=5, num_key_value_heads=5)))
    with pytest.raises(HFError, match=r"heads5: transformers cannot read its config.json .*not a multiple"):
        gpt_from_hf(str(heads))
    cut = shutil.copytree(llama, tmp_path / "cut")
    blob = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(HFError, match=r"model.safetensors cannot be read as safetensors"):
        gpt_from_hf(str(cut))
    ints = shutil.copytree(llama, tmp_path / "ints")
    tensors = load_file(ints / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones_like(tensors["model.norm.weight"], dtype=torch.int32)
    save_file(tensors, ints / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFError, match=r"weight model.norm.weight is torch.int32, not a floating-point"):
        gpt_from_hf(str(ints))
    evil = tmp_path / "evil"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64,
                                                         n_positions=32)).save_pretrained(evil)
    os.remove(evil / "model.safetensors")
    torch.save({"x": subprocess.Popen}, evil / "pytorch_model.bin")  # a global: refused by weights_only
    with pytest.raises(HFError, match=r"evil: the weights file holds Python objects other than tensors"):
        gpt_from_hf(str(evil))
    (evil / "pytorch_model.bin").write_bytes(b"<html>rate limited</html>" * 20)  # a bad download: no object
    with pytest.raises(HFError, match=r"evil: the weights file cannot be read \(Unsupported operand \d+\); it is "
                                      r"truncated or corrupt, download it again"):
        gpt_from_hf(str(evil))


def test_hf_export_onto_a_file_is_refused(tmp_path, char_ckpt):
    from export import export_hf
    from gpt_trainer.errors import HFError
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(HFError, match=r"--out=.*taken is a file, not a directory"):
        export_hf(str(char_ckpt / "ckpt.pt"), str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "mine"


def test_sample_prompts_and_lengths_that_cannot_be(tmp_path, char_ckpt):
    (tmp_path / "prompt.txt").write_bytes(b"caf\xe9\n")
    base = [f"--out_dir={char_ckpt}", "--device=cpu", "--num_samples=1"]
    results = run_cases("sample.py", [base + [f"--start=FILE:{tmp_path / 'prompt.txt'}"],
                                      base + ["--max_new_tokens=10000000000"]])
    assert results[0][0] == "error" and "prompt.txt: not UTF-8 text (byte 0xe9" in results[0][1], results
    assert results[1][0] == "error" and "max_new_tokens=10,000,000,000" in results[1][1], results


def test_metrics_jsonl_that_is_a_directory(tmp_path):
    from configurator import UserError
    from gpt_trainer.metrics import MetricsLogger
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match=r"metrics.jsonl is not a file"):
        MetricsLogger(str(tmp_path), start_iter=5)


# ----------------------------------------------------------------------------------------
# globs through symlink loops


@pytest.mark.parametrize("loops", [1, 2])
def test_glob_through_symlink_loops_takes_each_file_once(tmp_path, loops):
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("the one document\n")
    (root / "b.txt").write_text("and another\n")
    for k in range(loops):
        os.symlink(root, root / "sub" / f"loop{k}")  # d/sub/loop0 -> d
    r = run(PREPARE, f"--input={root}/**/*.txt", "--encoding=char", f"--out_dir={tmp_path / 'out'}",
            "--num_proc=1", timeout=60)
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path / "out")
    assert [os.path.basename(i["path"]) for i in meta["source"]["inputs"]] == ["b.txt", "a.txt"]


# ----------------------------------------------------------------------------------------
# fault injection: kill -9 and SIGTERM at random points, then the result of an uninterrupted run


def interrupt(cmd, log_path, rng, ready=None, after=1.0, startup=3.0, always=False):
    """Start cmd, then kill -9 or SIGTERM it at a random moment: within `startup` seconds of
    its start, or (7 times in 10, or always with `always`) within `after` seconds of `ready`
    appearing in its log. Returns (signal name, exit code)."""
    import signal
    import time
    from trainutil import child_env
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if ready and (always or rng.random() < 0.7):
                deadline = time.monotonic() + 120
                while ready not in open(log_path).read() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, after))
            else:
                time.sleep(rng.uniform(0.3, startup))
            sig = signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM
            if proc.poll() is None:
                proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # our own process group: encoder workers, if any
            except ProcessLookupError:
                pass
            proc.wait()
    return sig.name, rc


@pytest.mark.slow
def test_faults_at_random_points_give_the_uninterrupted_result(tmp_path, char_data):
    """8 kill -9s and SIGTERMs at random moments of training (start-up, steps, evals, every-step
    checkpoint writes), each followed by a restart with init_from='auto'; then 6 at random
    moments of a --resume prepare. The trained weights, optimizer state and logged losses
    equal an uninterrupted run's bitwise, and the prepared files an uninterrupted prepare's."""
    import random
    from test_run_resume import assert_same
    from trainutil import TRAIN, load_ckpt, read_metrics, run_train, step_losses
    rng = random.Random(23)
    settings = dict(max_iters=60, lr_decay_iters=60, warmup_iters=4, eval_interval=8, ckpt_interval=1,
                    dropout=0.1, gradient_accumulation_steps=2, init_from="auto")
    straight, faulted = str(tmp_path / "straight"), str(tmp_path / "faulted")
    run_train(straight, char_data, **settings)
    cmd = [sys.executable, TRAIN, *tiny(faulted, char_data, **settings)]
    seen, last = [], 0
    for attempt in range(8):
        # a fault during start-up twice; else just after an iteration this restart reaches, so
        # the faults land inside training however fast the machine runs it
        k = rng.randint(last, settings["max_iters"] - 8)
        ready = None if attempt in (0, 4) else f"iter {k}: loss "
        sig, rc = interrupt(cmd, tmp_path / "train.log", rng, ready=ready, after=0.05, startup=1.5, always=True)
        text = (tmp_path / "train.log").read_text()
        assert "Traceback" not in text, text[-3000:]
        assert rc in (0, -9, -15), (sig, rc, text[-2000:])  # -15: SIGTERM before the handler is set
        if os.path.exists(os.path.join(faulted, "ckpt.pt")):
            now = load_ckpt(faulted)["iter_num"]
            assert now >= last, "the checkpoint went back in time"
            last = now
        seen.append((sig, rc, last))
    print("\ntraining faults (signal, exit code, checkpoint iter):", seen)
    assert sum(0 < it < settings["max_iters"] for *_, it in seen) >= 4, "too few faults landed inside training"
    run_train(faulted, char_data, **settings)
    a, b = load_ckpt(straight), load_ckpt(faulted)
    assert a["iter_num"] == b["iter_num"] == settings["max_iters"]
    assert_same(a["model"], b["model"], "model")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")
    assert step_losses(read_metrics(faulted)) == step_losses(read_metrics(straight))

    # prepare: several inputs and a bpe tokenizer, encoded by 2 processes
    src = tmp_path / "src"
    src.mkdir()
    text = open(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")).read() \
        if os.path.exists(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")) else LINES * 20
    for k in range(4):
        (src / f"part{k}.txt").write_text(text[k * len(text) // 4:(k + 1) * len(text) // 4])
    (src / "extra.jsonl.gz").write_bytes(gzip.compress("".join(
        json.dumps({"text": text[i:i + 500]}) + "\n" for i in range(0, len(text), 500)).encode()))
    args = [f"--input={src}", "--encoding=bpe:512", "--num_proc=2", "--resume"]
    import time
    t0 = time.monotonic()
    r = run(PREPARE, *args, f"--out_dir={tmp_path / 'ref'}")
    assert r.returncode == 0, r.stderr
    duration = time.monotonic() - t0
    cmd = [sys.executable, PREPARE, *args, f"--out_dir={tmp_path / 'data'}"]
    seen = []
    for _ in range(6):
        sig, rc = interrupt(cmd, tmp_path / "prepare.log", rng, startup=duration)
        log = (tmp_path / "prepare.log").read_text()
        assert "Traceback" not in log, log[-3000:]
        seen.append((sig, rc, sorted(os.listdir(tmp_path / "data")) if (tmp_path / "data").exists() else None))
        if rc == 0:  # finished before the fault: start over for the next one
            for name in os.listdir(tmp_path / "data"):
                os.remove(tmp_path / "data" / name)
    print("prepare faults (signal, exit code):", seen)
    r = run(PREPARE, *args, f"--out_dir={tmp_path / 'data'}")
    assert r.returncode == 0, r.stderr
    ref, got = tmp_path / "ref", tmp_path / "data"
    assert sorted(os.listdir(got)) == sorted(os.listdir(ref))
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs mounted at tmp_path/ro, so that even root's writes fail with EROFS
    (permission bits do not stop root). Skipped where this process may not mount."""
    path = tmp_path / "ro"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a read-only tmpfs (root on Linux)")
    yield path
    subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_mount_is_one_line(tmp_path, read_only_dir, char_ckpt):
    """prepare into a data dir on a read-only mount, and evaluate.py --results there: one line
    saying so; evaluate refuses before it evaluates, so no work is lost."""
    (tmp_path / "a.txt").write_text(LINES)
    out = read_only_dir / "data"
    r = run(PREPARE, f"--input={tmp_path / 'a.txt'}", "--encoding=char", f"--out_dir={out}", "--num_proc=1")
    assert r.returncode == 1
    assert "is not writable" in one_error_line(r.stderr) and str(out) in r.stderr
    results = read_only_dir / "r.json"
    r = run("evaluate.py", f"--out_dir={char_ckpt}", "--device=cpu", "--eval_iters=1", "--batch_size=2",
            "--tasks=val", f"--results={results}")
    assert r.returncode == 1 and "results=" in one_error_line(r.stderr), r.stderr
    assert "val_loss" not in r.stdout  # refused before the evaluation ran
