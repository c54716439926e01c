"""
Shared helpers for the trainer tests (test_train.py, test_run_*.py, ...):
a tiny char-level dataset in a temp dir, train.py / torchrun as subprocesses with a tiny
model, and readers for out_dir/metrics.jsonl.
"""
import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from gpt_trainer.metrics import read_metrics  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")

# a model small enough that one train.py iteration is a few milliseconds on a CPU core
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=4,
            device="cpu", compile=False, gradient_accumulation_steps=1, log_interval=1,
            eval_interval=1000, max_iters=10, warmup_iters=2, lr_decay_iters=10,
            learning_rate=1e-3, min_lr=1e-4)


def need_tiktoken(*names):
    """Skip (saying what to provide) when tiktoken cannot load an encoding: it is downloaded
    on first use, and a fresh offline clone has no cache."""
    from gpt_trainer.dataloader import DataError
    from gpt_trainer.tokenizer import get_tokenizer
    for name in names:
        try:
            get_tokenizer(name)
        except DataError:
            pytest.skip(f"needs tiktoken's {name} encoding: run once online, or set "
                        f"TIKTOKEN_CACHE_DIR to a cache that holds it")


def corpus_text():
    """tinyshakespeare if the shared copy is there, else generated English-like text."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            return f.read()
    rng = np.random.default_rng(0)
    words = ("the king and queen of england shall speak to thee my lord what say you now "
             "good night sweet prince to be or not to be that is the question whether tis "
             "nobler in the mind to suffer").split()
    lines = []
    for _ in range(20000):
        line = " ".join(rng.choice(words, size=rng.integers(4, 12)))
        lines.append(line.capitalize() + rng.choice([".", ",", "!", "?", ";"]))
    return "\n".join(lines) + "\n"


def write_char_dataset(path, text, split=0.9):
    """train.bin / val.bin (uint16) and meta.json for a char-level dataset; returns path."""
    os.makedirs(path, exist_ok=True)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * split)
    ids[:n].tofile(os.path.join(path, "train.bin"))
    ids[n:].tofile(os.path.join(path, "val.bin"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"encoding": "char", "vocab_size": len(chars), "dtype": "uint16",
                   "chars": chars}, f)
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """A char-level dataset dir made from tinyshakespeare (shared by every test)."""
    return write_char_dataset(str(tmp_path_factory.mktemp("chardata")), corpus_text())


def train_args(out_dir, data_dir, **overrides):
    """train.py's argv for the tiny model; overrides win (None drops a setting)."""
    settings = dict(TINY, out_dir=out_dir, data_dir=data_dir)
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items() if v is not None]


def child_env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_train(out_dir, data_dir, *extra_args, env=None, timeout=300, check=True, **overrides):
    """Run train.py to completion; with check, fail the test (showing stderr) unless exit 0."""
    cmd = [sys.executable, TRAIN, *extra_args, *train_args(out_dir, data_dir, **overrides)]
    p = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"train.py exited {p.returncode}\ncmd: {' '.join(cmd)}\n"
                    f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def run_raw(args, env=None, timeout=120):
    """train.py with exactly these arguments (for configurator tests)."""
    return subprocess.run([sys.executable, TRAIN, *args], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


def popen_train(out_dir, data_dir, *extra_args, env=None, log=None, **overrides):
    cmd = [sys.executable, TRAIN, *extra_args, *train_args(out_dir, data_dir, **overrides)]
    return subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=log or subprocess.PIPE,
                            stderr=subprocess.STDOUT if log else subprocess.PIPE, text=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc, out_dir, data_dir, **overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=0",
            TRAIN, *train_args(out_dir, data_dir, **overrides)]


def run_torchrun(nproc, out_dir, data_dir, timeout=300, check=True, **overrides):
    cmd = torchrun_cmd(nproc, out_dir, data_dir, **overrides)
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"torchrun exited {p.returncode}\ncmd: {' '.join(cmd)}\n"
                    f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}")
    return p


def load_ckpt(out_dir, name="ckpt.pt"):
    import torch
    return torch.load(os.path.join(out_dir, name), map_location="cpu", weights_only=True)


def unique_history(out_dir):
    """Per-step losses and evals; each iter at most once (a resumed file reads as one run)."""
    records = read_metrics(out_dir)
    steps = [r["iter"] for r in records if "loss" in r]
    evals = [r["iter"] for r in records if "val_loss" in r]
    assert len(steps) == len(set(steps)), f"step records written more than once: {steps}"
    assert len(evals) == len(set(evals)), f"eval records written more than once: {evals}"
    return step_losses(records), eval_losses(records)


def step_losses(records):
    """{iter: logged train loss} from the per-step log records."""
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def eval_losses(records):
    """{iter: (train_loss, val_loss)} from the evaluation records."""
    return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r}


def last_logged_iter(out_dir):
    """Largest iter with a complete per-step log line (tolerates a half-written last line)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    best = -1
    if not os.path.exists(path):
        return best
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "loss" in r:
                best = max(best, r["iter"])
    return best


def wait_for(predicate, timeout, proc=None, interval=0.05):
    """Poll until predicate() is true; fail if proc exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited {proc.returncode} before the condition held\n"
                        f"stdout:\n{(out or '')[-3000:]}\nstderr:\n{(err or '')[-3000:]}")
        time.sleep(interval)
    pytest.fail("timed out waiting for the condition")


def kill_tree(proc):
    """Best-effort SIGKILL of a process we started (and its process group if it leads one)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def one_error_line(stderr):
    """The stderr of a user mistake: exactly one non-empty line, starting 'error: '."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def worker_pids(agent_pid):
    """{rank: pid} of torchrun's worker processes, from their environment."""
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout
    ranks = {}
    for pid in map(int, out.split()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


class FullDisk:
    """A file on a disk with `room` bytes left: writes beyond it are short, then fail (ENOSPC)."""

    def __init__(self, path, mode, room):
        self.f, self.room = open(path, mode), room

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), self.room)
        self.room -= n
        return self.f.write(data[:n])

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


# full disk (RLIMIT_FSIZE: writes past the limit fail with EFBIG, like ENOSPC)
LIMIT = 100_000


def small_fsize():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
