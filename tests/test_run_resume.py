"""
Exact resume and crash safety: a run stopped and resumed is bitwise the run that was never
stopped; SIGTERM/SIGINT save and exit 0; kill -9 at any moment (also mid-save) leaves a
loadable checkpoint; non-finite steps are skipped (on the device, without a host sync) and
stop the run; a failed write (full disk) keeps the previous checkpoint byte for byte.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainutil import (LIMIT, REPO, TRAIN, char_data, child_env, eval_losses, kill_tree,  # noqa: F401
                       last_logged_iter, load_ckpt, popen_train, read_metrics, run_train, small_fsize,
                       step_losses, train_args, wait_for)

from gpt_trainer import checkpoint  # noqa: E402
from gpt_trainer import metrics  # noqa: E402
from gpt_trainer import optim  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def assert_same(a, b, where="ckpt"):
    """Recursive exact equality of checkpoint contents (tensors with torch.equal)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics_history(out):
    """Per-step (loss, lr) and evals; each iter at most once (a resumed file reads as one run)."""
    records = read_metrics(out)
    steps = [r["iter"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"duplicate step records: {steps}"
    evals = [r["iter"] for r in records if "val_loss" in r]
    assert len(evals) == len(set(evals)), f"duplicate eval records: {evals}"
    return ({r["iter"]: (r["loss"], r["lr"]) for r in records if "loss" in r}, eval_losses(records))


def assert_resume_is_exact(straight, resumed, n):
    steps_a, evals_a = metrics_history(straight)
    steps_b, evals_b = metrics_history(resumed)
    assert sorted(steps_a) == list(range(n))
    assert steps_b == steps_a  # exact ==, loss and lr, every iteration
    assert evals_b == evals_a
    a, b = load_ckpt(straight), load_ckpt(resumed)
    assert a["iter_num"] == b["iter_num"] == n
    assert_same(a["model"], b["model"], "model")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")
    # torch's RNG drives dropout; numpy/python RNGs are not seeded by train.py and nothing
    # draws from them, so only their restore (not their value) is reproducible
    assert_same([r["torch"] for r in a["rng"]], [r["torch"] for r in b["rng"]], "rng.torch")
    assert_same(a["sampler"], b["sampler"], "sampler")
    assert a["best_val_loss"] == b["best_val_loss"]


def stop_and_resume(out, data, k, n, **settings):
    run_train(out, data, max_iters=k, **settings)
    assert load_ckpt(out)["iter_num"] == k
    p = run_train(out, data, init_from="resume", max_iters=n, **settings)
    first = next(line for line in p.stdout.splitlines() if line.startswith("iter "))
    assert first.startswith(f"iter {k}:"), first
    assert "note:" not in p.stderr, p.stderr  # no 'RNG states differ' warning


# -----------------------------------------------------------------------------
# bitwise resume

N = 24
BITWISE = dict(dropout=0.1, gradient_accumulation_steps=2, warmup_iters=8, eval_interval=6,
               ckpt_interval=1000, lr_decay_iters=N, learning_rate=3e-3, min_lr=3e-4)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, char_data):
    out = str(tmp_path_factory.mktemp("straight") / "out")
    run_train(out, char_data, max_iters=N, **BITWISE)
    return out


@pytest.mark.parametrize("k", [pytest.param(3, marks=pytest.mark.slow), pytest.param(6, marks=pytest.mark.slow), 13],
                         ids=["in-warmup", "at-eval", "mid-decay"])
def test_resume_is_bitwise(tmp_path, straight_run, char_data, k):
    out = str(tmp_path / "out")
    stop_and_resume(out, char_data, k, N, **BITWISE)
    assert_resume_is_exact(straight_run, out, N)


# between them, the two option sets switch on every non-GPT-2 option of GPTConfig
LLAMA = dict(optimizer="muon", muon_lr=0.02, pos_emb="rope", norm="rmsnorm", mlp="swiglu",
             n_kv_head=1, multiple_of=16)
MODDED = dict(mlp="relu2", qk_norm=True, tie_embeddings=False, bias=False, logit_softcap=15.0,
              lr_schedule="wsd")


@pytest.mark.slow
@pytest.mark.parametrize("options", [LLAMA, MODDED], ids=["llama-muon", "relu2-qknorm-untied-softcap"])
def test_resume_is_bitwise_with_options(tmp_path, char_data, options):
    """Muon (two optimizers) and the non-GPT-2 architecture options resume exactly too."""
    settings = dict(BITWISE, gradient_accumulation_steps=1, eval_interval=4, lr_decay_iters=12,
                    warmup_iters=3, **options)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train(straight, char_data, max_iters=12, **settings)
    stop_and_resume(resumed, char_data, 5, 12, **settings)
    assert_resume_is_exact(straight, resumed, 12)
    ckpt = load_ckpt(straight)
    for key, value in options.items():
        assert ckpt["model_args"].get(key, ckpt["config"][key]) == value
    losses = step_losses(read_metrics(straight))
    assert losses[11] < losses[0] - 0.3, "the options train"
    if options.get("optimizer") == "muon":
        assert len(ckpt["optimizer"]) == 2, "AdamW and Muon states"


# -----------------------------------------------------------------------------
# SIGTERM / SIGINT: finish the step, save, exit 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_resumes(tmp_path, char_data, signum):
    out = str(tmp_path / "out")
    settings = dict(max_iters=10000, lr_decay_iters=10000, ckpt_interval=10000, eval_interval=10000)
    with open(tmp_path / "log.txt", "w") as log:
        proc = popen_train(out, char_data, log=log, **settings)
        try:
            wait_for(lambda: last_logged_iter(out) >= 5, timeout=120, proc=proc)
            proc.send_signal(signum)
            rc = proc.wait(timeout=60)
        finally:
            kill_tree(proc)
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text
    ckpt = load_ckpt(out)
    last = last_logged_iter(out)
    assert ckpt["iter_num"] == last + 1, "at most the step in flight is finished, none lost"
    assert f"saved {os.path.join(out, 'ckpt.pt')} at iter {last + 1}" in text
    n = ckpt["iter_num"]
    p = run_train(out, char_data, init_from="resume", **dict(settings, max_iters=n + 3))
    first = next(line for line in p.stdout.splitlines() if line.startswith("iter "))
    assert first.startswith(f"iter {n}:"), first
    steps, _ = metrics_history(out)
    assert sorted(steps) == list(range(n + 3))
    assert load_ckpt(out)["iter_num"] == n + 3


# -----------------------------------------------------------------------------
# kill -9 at random moments, many of them during torch.save


def temp_files(out):
    return sorted(f for f in os.listdir(out) if f.startswith(".ckpt.pt.tmp")) if os.path.isdir(out) else []


@pytest.mark.slow
def test_sigkill_anywhere(tmp_path, char_data):
    """20 kill -9s: 4 at random moments of start-up, 16 at random moments of training, where
    ckpt.pt is rewritten every step (a 10 MB checkpoint, so many kills land mid-save). After
    every kill ckpt.pt (once written) loads with weights_only and never goes back in time; the
    next start with init_from='auto' resumes from it; stale temp files are cleaned up."""
    out = str(tmp_path / "out")
    big = dict(n_embd=128, n_layer=4, n_head=4, ckpt_interval=1, max_iters=100000,
               lr_decay_iters=100000, eval_interval=100000, init_from="auto")
    rng = random.Random(1234)
    last_iter, torn, resumed = 0, 0, 0
    log_path = tmp_path / "log.txt"
    for round_ in range(20):
        with open(log_path, "w") as log:
            proc = popen_train(out, char_data, log=log, **big)
            try:
                if round_ % 5 == 4:
                    time.sleep(rng.uniform(0.3, 2.5))  # during start-up (imports, loading, truncation)
                else:
                    start = last_logged_iter(out)
                    wait_for(lambda: last_logged_iter(out) > start, timeout=120, proc=proc, interval=0.02)
                    time.sleep(rng.uniform(0.0, 0.6))
            finally:
                kill_tree(proc)
        assert proc.returncode == -signal.SIGKILL
        text = log_path.read_text()
        if os.path.exists(os.path.join(out, "ckpt.pt")):
            resumed += "resuming from" in text
            ckpt = load_ckpt(out)  # must never be half-written
            assert set(ckpt) >= {"model", "optimizer", "model_args", "iter_num", "rng"}
            assert ckpt["iter_num"] >= last_iter, "the checkpoint went back in time"
            last_iter = ckpt["iter_num"]
        else:
            assert last_iter == 0, "ckpt.pt disappeared"
        temps = temp_files(out)
        torn += bool(temps)
        assert len(temps) <= 1, f"stale temp files pile up: {temps}"
    print(f"\n20 kills: {torn} left a temp file (killed mid-save), last checkpoint at iter {last_iter}, "
          f"{resumed} restarts resumed")
    assert last_iter > 0, "no kill came after the first save; the test did not test much"
    assert resumed >= 10
    # a final run to completion resumes and cleans up
    p = run_train(out, char_data, **dict(big, max_iters=last_iter + 3, ckpt_interval=1000))
    assert "resuming from" in p.stdout
    assert load_ckpt(out)["iter_num"] == last_iter + 3
    assert temp_files(out) == [], "temp files of killed writers survive a completed save"
    steps, _ = metrics_history(out)
    assert sorted(steps) == list(range(last_iter + 3)), "metrics.jsonl reads as one run"


def test_truncate_metrics_tolerates_a_torn_last_line(tmp_path):
    """kill -9 or a power cut mid-append can leave a partial last line in metrics.jsonl; the
    resume that truncates the file must not crash on it."""
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"iter": 0, "loss": 4.0}\n{"iter": 1, "loss": 3.9}\n{"iter": 2, "lo')
    metrics.truncate_metrics(path, 2)
    assert [line for line in open(path)] == ['{"iter": 0, "loss": 4.0}\n', '{"iter": 1, "loss": 3.9}\n']


# -----------------------------------------------------------------------------
# non-finite steps


@pytest.fixture(scope="module")
def sane_run(tmp_path_factory, char_data):
    """4 sane iterations with ckpt.pt saved at every one: the last good state is iter 4."""
    out = str(tmp_path_factory.mktemp("sane") / "out")
    run_train(out, char_data, max_iters=4, ckpt_interval=1)
    assert load_ckpt(out)["iter_num"] == 4
    return out


def copy_run(src, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(src, out)
    return out


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_stop(tmp_path, sane_run, char_data):
    out = copy_run(sane_run, tmp_path)
    # learning_rate is not a model arg: overriding it on resume is allowed (and must take effect)
    p = run_train(out, char_data, init_from="resume", learning_rate=1e30, grad_clip=0, warmup_iters=0,
                  decay_lr=False, max_bad_steps=3, max_iters=50, ckpt_interval=1, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "non-finite" in last and os.path.join(out, "ckpt.pt") in last
    records = read_metrics(out)
    assert [r["lr"] for r in records if "loss" in r and r["iter"] >= 4][0] == 1e30
    skipped = [r for r in records if r.get("skipped_step")]
    assert [r["bad_steps"] for r in skipped] == [1, 2, 3]
    first_bad = skipped[0]["iter"]
    assert [r["iter"] for r in skipped] == [first_bad, first_bad + 1, first_bad + 2]
    assert first_bad > 4, "the first step at the absurd rate computes a finite loss"
    ckpt = load_ckpt(out)  # the last save before the stop still loads, with finite weights
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert first_bad <= ckpt["iter_num"] <= first_bad + 2
    assert ckpt["bad_steps"] == ckpt["iter_num"] - first_bad < 3


@pytest.mark.slow
def test_non_finite_stop_keeps_last_good_checkpoint(tmp_path, sane_run, char_data):
    """With no save between the last good checkpoint and the stop, ckpt.pt is untouched."""
    out = copy_run(sane_run, tmp_path)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    p = run_train(out, char_data, init_from="resume", learning_rate=1e30, grad_clip=0, decay_lr=False,
                  max_bad_steps=2, max_iters=50, ckpt_interval=100, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    # the good state resumes, and a learning rate given on resume replaces the checkpoint's
    # (the optimizer's saved param_groups must not win over this run's settings)
    run_train(out, char_data, init_from="resume", max_iters=6, ckpt_interval=1, learning_rate=5e-4,
              min_lr=5e-4, weight_decay=0.05)
    ckpt = load_ckpt(out)
    assert ckpt["iter_num"] == 6
    adamw = ckpt["optimizer"]  # one optimizer: its state_dict itself, as nanoGPT saves it
    for group in adamw["param_groups"]:
        assert group["base_lr"] == 5e-4 and group["lr"] == pytest.approx(5e-4)
    assert sorted(g["weight_decay"] for g in adamw["param_groups"]) == [0.0, 0.05]


@pytest.mark.slow
def test_skipped_steps_are_counted_at_log_steps(tmp_path, sane_run, char_data):
    """The host reads the non-finite flags only at log and checkpoint steps; what it reports
    there (each skipped iter, the run length, the stop) is what logging every step reports."""
    bad = dict(init_from="resume", learning_rate=1e30, grad_clip=0, warmup_iters=0, decay_lr=False,
               max_bad_steps=3, max_iters=50, ckpt_interval=100, check=False)
    every, sparse = copy_run(sane_run, tmp_path / "every"), copy_run(sane_run, tmp_path / "sparse")
    p_every = run_train(every, char_data, log_interval=1, **bad)
    p_sparse = run_train(sparse, char_data, log_interval=7, **bad)
    assert p_every.returncode == p_sparse.returncode == 1
    skips = [[line.replace(out, "OUT") for line in p.stderr.splitlines()
              if "update skipped" in line or "error:" in line]
             for p, out in ((p_every, every), (p_sparse, sparse))]
    assert len(skips[0]) == 4 and skips[0] == skips[1]
    assert [r for r in read_metrics(every) if r.get("skipped_step")] == \
        [r for r in read_metrics(sparse) if r.get("skipped_step")]


def test_step_optimizers_skips_on_the_device(monkeypatch):
    """finite=0 leaves weights and optimizer state bitwise as they were; finite=1 is a plain
    step. Fused AdamW decides without reading the flag on the host; Muon reads it."""
    def make():
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
        opts = optim.configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), "cpu", "muon", 0.02, 0.95)
        for _ in range(2):  # some optimizer state to keep
            x = torch.randint(0, 32, (2, 8))
            model(x, x)[1].backward()
            for opt in opts:
                opt.step()
        model(x, x)[1].backward()
        return model, opts

    def state(model, opts):
        return [t.clone() for t in model.state_dict().values()] + [
            v.clone() for opt in opts for s in opt.state.values() for v in s.values()]

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model, opts = make()
    before = state(model, opts)
    adamw, muon = opts
    assert adamw.param_groups[0]["fused"] and not muon.param_groups[0].get("fused")
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", lambda t: pytest.fail("fused AdamW read the flag on the host"))
        optim.step_optimizers([adamw], scaler, torch.tensor(0.0))
    optim.step_optimizers([muon], scaler, torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(before, state(model, opts)))
    optim.step_optimizers(opts, scaler, torch.tensor(1.0))
    stepped = state(model, opts)
    model, opts = make()
    for opt in opts:
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(stepped, state(model, opts)))
    assert not all(torch.equal(a, b) for a, b in zip(before, stepped))


# the training loop, run inside a process that records every read of a tensor by the host
# (item, bool, float, int, tolist) with the loop's iter_num at that moment
HOST_READ_PROBE = """
import json, runpy, sys, torch
reads = []
def probe(name):
    original = getattr(torch.Tensor, name)
    def read(self, *args):
        frame = sys._getframe(1)
        while frame and not (frame.f_code.co_name == "<module>" and frame.f_code.co_filename == sys.argv[0]):
            frame = frame.f_back
        if frame is not None and "iter_num" in frame.f_globals:
            reads.append([frame.f_globals["iter_num"], name, sys._getframe(1).f_code.co_name])
        return original(self, *args)
    setattr(torch.Tensor, name, read)
for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
    probe(name)
out, sys.argv = sys.argv[1], sys.argv[2:]  # argv: -c OUT train.py --settings...
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    json.dump(reads, open(out, "w"))
"""


def test_steps_between_log_steps_have_no_host_sync(tmp_path, char_data):
    out, reads_path = str(tmp_path / "out"), str(tmp_path / "reads.json")
    cmd = [sys.executable, "-c", HOST_READ_PROBE, reads_path, TRAIN,
           *train_args(out, char_data, log_interval=5, eval_interval=1000, max_iters=12)]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    reads = json.load(open(reads_path))
    assert any(it == 5 and name == "item" for it, name, _ in reads), "the probe sees log steps"
    # iters 0, 5, 10 log; 11 is the last step before the save at 12; eval runs at 0 and 12
    assert [r for r in reads if r[0] not in (0, 5, 10, 11, 12)] == []


def test_save_checkpoint_refuses_nan(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    good = {"model": {"w": torch.ones(3)}, "iter_num": 1}
    checkpoint.save_checkpoint(good, path)
    before = open(path, "rb").read()
    bad = {"model": {"w": torch.tensor([1.0, float("nan"), 2.0])}, "iter_num": 2}
    with pytest.raises(checkpoint.CheckpointError, match="w.*NaN"):
        checkpoint.save_checkpoint(bad, path)
    with pytest.raises(checkpoint.CheckpointError, match="inf"):
        checkpoint.save_checkpoint({"model": {"w": torch.tensor([float("inf")])}}, path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


# -----------------------------------------------------------------------------
# full disk (RLIMIT_FSIZE: writes past the limit fail with EFBIG, like ENOSPC)

@pytest.mark.slow
def test_train_full_disk(tmp_path, sane_run, char_data):
    out = copy_run(sane_run, tmp_path)
    path = os.path.join(out, "ckpt.pt")
    before = open(path, "rb").read()
    assert len(before) > LIMIT
    cmd = [sys.executable, TRAIN, *train_args(out, char_data, init_from="resume", max_iters=6, ckpt_interval=1)]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                       preexec_fn=small_fsize, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write {path}"), p.stderr
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "metrics.jsonl"]
    assert load_ckpt(out)["iter_num"] == 4
