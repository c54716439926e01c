"""
Never lose a run, tested on whole runs of train.py and sample.py: a second run on a busy
out_dir, a killed lock holder, --overwrite, nanoGPT's checkpoints resumed, damaged metrics and
full disks at resume, a non-finite stop before the first save, one-line errors from the
scripts, and a dead rank under torchrun named with the checkpoint that is intact.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from trainutil import (REPO, TRAIN, char_data, child_env, kill_tree, last_logged_iter,  # noqa: F401
                       load_ckpt, one_error_line, popen_train, read_metrics, run_train, step_losses,
                       torchrun_cmd, train_args, wait_for)

from gpt_trainer import checkpoint
from gpt_trainer import metrics
from gpt_trainer import optim
from model import GPT, GPTConfig
from test_checkpoint import nanogpt_checkpoint, our_checkpoint

SAMPLE = os.path.join(REPO, "sample.py")

LONG = dict(max_iters=100000, lr_decay_iters=100000, eval_interval=100000)


@pytest.mark.slow
def test_second_run_on_a_busy_out_dir_stops_at_once(tmp_path, char_data):
    out = str(tmp_path / "out")
    with open(tmp_path / "first.txt", "w") as log:
        first = popen_train(out, char_data, log=log, ckpt_interval=5, **LONG)
        try:
            wait_for(lambda: last_logged_iter(out) >= 6, timeout=120, proc=first)
            for init_from in ("scratch", "auto", "resume"):
                p = run_train(out, char_data, init_from=init_from, check=False, max_iters=3)
                assert p.returncode == 1, p.stdout + p.stderr
                line = one_error_line(p.stderr)
                assert f"{out} is in use by another run (pid {first.pid} on {socket.gethostname()}" in line
                assert p.stdout == ""
            first.send_signal(signal.SIGTERM)  # it saves and exits 0
            assert first.wait(timeout=60) == 0
        finally:
            kill_tree(first)
    n = load_ckpt(out)["iter_num"]
    assert n == last_logged_iter(out) + 1
    steps = [r["iter"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(n)), "the second run touched the first's metrics"


@pytest.mark.slow
def test_killed_holder_does_not_block_the_next_run(tmp_path, char_data):
    out = str(tmp_path / "out")
    with open(tmp_path / "log.txt", "w") as log:
        first = popen_train(out, char_data, log=log, ckpt_interval=2, **LONG)
        try:
            wait_for(lambda: os.path.exists(os.path.join(out, "ckpt.pt")), timeout=120, proc=first)
        finally:
            kill_tree(first)
    n = load_ckpt(out)["iter_num"]
    p = run_train(out, char_data, init_from="auto", max_iters=n + 2)
    assert f"resuming from {out}/ckpt.pt at iter {n}" in p.stdout
    assert load_ckpt(out)["iter_num"] == n + 2


@pytest.mark.slow
def test_scratch_refuses_then_overwrite_starts_over(tmp_path, char_data):
    out = str(tmp_path / "out")
    run_train(out, char_data, max_iters=6, eval_interval=2, learning_rate=1e-2, warmup_iters=0,
              always_save_checkpoint=False)
    files = {name: open(os.path.join(out, name), "rb").read()
             for name in ("ckpt.pt", "best.pt", "metrics.jsonl")}
    p = run_train(out, char_data, max_iters=3, check=False)
    assert p.returncode == 1
    assert "--overwrite=True" in one_error_line(p.stderr)
    assert {name: open(os.path.join(out, name), "rb").read() for name in files} == files
    # overwrite: the old best.pt goes with the old run; sample.py then reads the new ckpt.pt
    p = run_train(out, char_data, max_iters=3, overwrite=True)
    assert "removed ckpt.pt, best.pt, metrics.jsonl of an earlier run" in p.stdout
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "metrics.jsonl"]
    assert load_ckpt(out)["iter_num"] == 3
    assert sorted(step_losses(read_metrics(out))) == [0, 1, 2]


@pytest.mark.slow
def test_nanogpt_checkpoint_resumes_and_trains(tmp_path, char_data):
    """A checkpoint laid out as nanoGPT writes one resumes and trains (it crashed inside fused
    AdamW) exactly like the same state saved with parameter names in this project's order."""
    vocab = json.load(open(os.path.join(char_data, "meta.json")))["vocab_size"]
    ckpt, nano_opt, nano_names = nanogpt_checkpoint(vocab)
    nano, named = str(tmp_path / "nano"), str(tmp_path / "named")
    os.makedirs(nano)
    torch.save(ckpt, os.path.join(nano, "ckpt.pt"))
    # the twin: the same state by name, in this project's order
    model = GPT(GPTConfig(**ckpt["model_args"]))
    (opt,) = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    names = checkpoint.param_names(model, opt)
    by_name = dict(zip(nano_names, [nano_opt.state_dict()["state"][i] for i in range(len(nano_names))]))
    flat = [n for g in names for n in g]
    groups, first = [], 0
    for group, saved in zip(names, nano_opt.state_dict()["param_groups"]):
        groups.append(dict(saved, params=list(range(first, first + len(group))), param_names=group))
        first += len(group)
    os.makedirs(named)
    twin = {"state": {i: by_name[n] for i, n in enumerate(flat)}, "param_groups": groups}
    torch.save(dict(ckpt, optimizer=twin), os.path.join(named, "ckpt.pt"))
    for out in (nano, named):
        run_train(out, char_data, init_from="resume", max_iters=6, learning_rate=1e-3, warmup_iters=0)
    a, b = load_ckpt(nano), load_ckpt(named)
    assert a["iter_num"] == b["iter_num"] == 6
    assert step_losses(read_metrics(nano)) == step_losses(read_metrics(named))
    assert sorted(step_losses(read_metrics(nano))) == [3, 4, 5]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert not torch.equal(a["model"]["transformer.wpe.weight"],
                           ckpt["model"]["_orig_mod.transformer.wpe.weight"]), "it trained"


@pytest.mark.slow
def test_damaged_metrics_never_block_a_resume(tmp_path, char_data):
    out = str(tmp_path / "out")
    run_train(out, char_data, max_iters=4)
    n = len(read_metrics(out))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write("[1, 2]\n" + "\0" * 512)
    p = run_train(out, char_data, init_from="resume", max_iters=6)
    assert f"warning: {out}/metrics.jsonl: dropped 2 damaged lines (lines {n + 1}, {n + 2})" in p.stderr
    assert sorted(step_losses(read_metrics(out))) == list(range(6))


FSIZE = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_full_disk_at_resume_and_while_appending_metrics_is_one_line(tmp_path, char_data):
    out = str(tmp_path / "out")
    run_train(out, char_data, max_iters=4)  # metrics.jsonl ends with the eval at iter 4
    path = os.path.join(out, "metrics.jsonl")
    limit = os.path.getsize(os.path.join(out, "ckpt.pt")) * 2
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:  # metrics.jsonl reaches the file size limit, the checkpoint does not
        f.writelines(lines[:-1])
        while f.tell() < limit:
            f.write(json.dumps({"iter": 0, "note": "x" * 1000}) + "\n")
        f.write(lines[-1])
    files = {name: open(os.path.join(out, name), "rb").read() for name in ("ckpt.pt", "metrics.jsonl")}
    cmd = [sys.executable, "-c", FSIZE.format(limit=limit), TRAIN,
           *train_args(out, char_data, init_from="resume", max_iters=8)]

    def resume():
        p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 1
        return one_error_line(p.stderr)

    # at resume, dropping the records at and after iter 4 needs a rewrite
    assert resume() == (f"error: could not rewrite {path} to resume: file too large (the file size limit, "
                        f"ulimit -f, or the filesystem's); it and the checkpoints are unchanged; free some "
                        f"space and run again")
    assert {name: open(os.path.join(out, name), "rb").read() for name in files} == files
    metrics.truncate_metrics(path, 4)
    line = resume()  # the first append, the log line of iter 4
    assert line.startswith(f"error: could not append to {path}: file too large")
    assert "the records before iter 4 and the checkpoints are intact" in line
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == files["ckpt.pt"]


@pytest.mark.slow
def test_non_finite_stop_before_the_first_save(tmp_path, char_data):
    out = str(tmp_path / "out")
    p = run_train(out, char_data, learning_rate=1e30, grad_clip=0, warmup_iters=0, decay_lr=False,
                  max_bad_steps=2, max_iters=50, ckpt_interval=100, check=False)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and last.endswith(f"no checkpoint has been written to {out} yet")
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


@pytest.mark.slow
def test_one_line_errors_from_the_scripts(tmp_path, char_data):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    bad = tmp_path / "bad"
    bad.mkdir()
    ckpt, _, _, _ = our_checkpoint(bad)
    del ckpt["iter_num"]
    torch.save(ckpt, bad / "ckpt.pt")
    runs = {"device=cuda": [TRAIN, *train_args(str(tmp_path / "a"), char_data, device="cuda")],
            "sample device=cuda": [SAMPLE, f"--out_dir={bad}", "--device=cuda"],
            "sample device=mps": [SAMPLE, f"--out_dir={bad}", "--device=mps"],
            "out_dir is a file": [TRAIN, *train_args(str(notes), char_data)],
            "no iter_num": [TRAIN, *train_args(str(bad), char_data, init_from="resume")]}
    expected = {"device=cuda": "device='cuda' but this machine has no CUDA",
                "sample device=cuda": "device='cuda' but this machine has no CUDA",
                "sample device=mps": "device='mps' but this machine has no MPS",
                "out_dir is a file": f"out_dir={notes} is a file, not a directory",
                "no iter_num": f"{bad}/ckpt.pt has no valid 'iter_num'"}
    for name, argv in runs.items():
        if "cuda" in name and torch.cuda.is_available() or "mps" in name and torch.backends.mps.is_available():
            continue
        p = subprocess.run([sys.executable, *argv], cwd=REPO, env=child_env(), capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 1, (name, p.stderr)
        assert expected[name] in one_error_line(p.stderr), name
    assert not os.path.exists(tmp_path / "a")


@pytest.mark.slow
def test_dead_rank_is_named_with_the_intact_checkpoint(tmp_path, char_data):
    from trainutil import worker_pids
    out = str(tmp_path / "out")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(torchrun_cmd(2, out, char_data, gradient_accumulation_steps=2, ckpt_interval=4,
                                             **LONG), cwd=REPO, env=child_env(), stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: os.path.exists(os.path.join(out, "ckpt.pt")) and last_logged_iter(out) >= 6,
                     timeout=180, proc=proc)
            os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
            rc = proc.wait(timeout=120)
        finally:
            kill_tree(proc)
    text = (tmp_path / "log.txt").read_text()
    assert rc != 0
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    n = load_ckpt(out)["iter_num"]
    assert errors == [f"error: rank 1 died; rank 0 stops too; {out}/ckpt.pt (iter {n}) is intact; "
                      f"resume with --init_from=resume"], text[-3000:]
    assert 'train.py", line' not in text and "gloo" not in text, text[-3000:]
