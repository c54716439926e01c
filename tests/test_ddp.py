"""
DDP on CPU (gloo, 2 processes under torchrun): the same numbers as one process, exact
resume, rank 0 alone writes, one clear error for a bad setting, and a SIGTERM to any rank
stops every rank at the same step with a checkpoint.
"""
import os
import signal
import subprocess

import pytest
import torch

from trainutil import (REPO, char_data, child_env, kill_tree, last_logged_iter,  # noqa: F401
                       load_ckpt, run_torchrun, run_train, torchrun_cmd, unique_history, wait_for)

pytestmark = pytest.mark.slow  # every test here runs torchrun


COMPARE = dict(gradient_accumulation_steps=4, max_iters=8, eval_interval=4, warmup_iters=2,
               lr_decay_iters=8, learning_rate=3e-3, min_lr=3e-4)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, char_data):
    out = str(tmp_path_factory.mktemp("ddp") / "out")
    p = run_torchrun(2, out, char_data, **COMPARE)
    return out, p


def test_ddp_matches_single_process(tmp_path, ddp_run, char_data):
    """1 process x 4 micro-steps and 2 processes x 2 micro-steps see the same 4 micro-batches
    per step (the data order does not depend on the world size), so they train the same model
    up to float summation order."""
    ddp_out, p = ddp_run
    assert "world size 2, 2 micro-steps per rank" in p.stdout
    single = str(tmp_path / "single")
    q = run_train(single, char_data, **COMPARE)
    assert "world size 1, 4 micro-steps per rank" in q.stdout
    steps_1, evals_1 = unique_history(single)
    steps_2, evals_2 = unique_history(ddp_out)
    assert sorted(steps_2) == sorted(steps_1) == list(range(8))
    for it in steps_1:
        assert steps_2[it] == pytest.approx(steps_1[it], rel=1e-5), it
    assert sorted(evals_2) == sorted(evals_1) == [0, 4, 8]
    for it in evals_1:
        assert evals_2[it] == pytest.approx(evals_1[it], rel=1e-5, abs=1e-5), it
    a, b = load_ckpt(single), load_ckpt(ddp_out)
    assert a["iter_num"] == b["iter_num"] == 8
    assert a["world_size"] == 1 and b["world_size"] == 2 and len(b["rng"]) == 2
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-5, msg=k)
    # the reference is not trivially satisfied: training moved the weights well beyond atol
    init_delta = max((a["model"][k] - load_first(single)[k]).abs().max().item() for k in a["model"])
    assert init_delta > 1e-3


def load_first(out):
    """Weights of the same tiny model at init (seed 1337), for the size of the training update."""
    ckpt = load_ckpt(out)
    torch.manual_seed(ckpt["config"]["seed"])
    from model import GPT, GPTConfig
    return GPT(GPTConfig(**ckpt["model_args"])).state_dict()


def test_only_rank0_writes(ddp_run):
    out, p = ddp_run
    steps, evals = unique_history(out)
    assert sorted(steps) == list(range(8)) and sorted(evals) == [0, 4, 8]
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "metrics.jsonl"]
    assert p.stdout.count("saved ") == 2  # iter 4 and 8, printed by rank 0 only


def test_ddp_resume_is_bitwise(tmp_path, char_data):
    settings = dict(dropout=0.1, gradient_accumulation_steps=4, eval_interval=4, warmup_iters=3,
                    lr_decay_iters=12, ckpt_interval=1000, learning_rate=3e-3, min_lr=3e-4)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_torchrun(2, straight, char_data, max_iters=12, **settings)
    run_torchrun(2, resumed, char_data, max_iters=5, **settings)
    assert load_ckpt(resumed)["iter_num"] == 5 and len(load_ckpt(resumed)["rng"]) == 2
    p = run_torchrun(2, resumed, char_data, max_iters=12, init_from="resume", **settings)
    assert "note:" not in p.stderr
    steps_a, evals_a = unique_history(straight)
    steps_b, evals_b = unique_history(resumed)
    assert sorted(steps_a) == list(range(12))
    assert steps_b == steps_a and evals_b == evals_a  # exact
    a, b = load_ckpt(straight), load_ckpt(resumed)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    states = [c["optimizer"] if isinstance(c["optimizer"], list) else [c["optimizer"]] for c in (a, b)]
    for sa, sb in zip(*states):  # one optimizer is saved as its state_dict, several as a list
        for idx, st in sa["state"].items():
            for name, t in st.items():
                assert torch.equal(t, sb["state"][idx][name]), (idx, name)
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"])


def test_grad_accum_not_divisible_by_world_size(tmp_path, char_data):
    p = run_torchrun(2, str(tmp_path / "out"), char_data, gradient_accumulation_steps=3, check=False,
                     timeout=120)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if "error: " in line]
    assert errors, p.stderr[-3000:]
    assert all("gradient_accumulation_steps=3" in line and "2" in line for line in errors), errors
    assert 'train.py", line' not in p.stderr, "a traceback from train.py instead of one line"


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


LONG = dict(gradient_accumulation_steps=2, max_iters=100000, lr_decay_iters=100000,
            ckpt_interval=100000, eval_interval=100000)


def start_ddp(out, data, log):
    proc = subprocess.Popen(torchrun_cmd(2, out, data, **LONG), cwd=REPO, env=child_env(),
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: last_logged_iter(out) >= 5, timeout=180, proc=proc)
    return proc


def test_sigterm_to_one_rank(tmp_path, char_data):
    """SIGTERM to rank 1 alone (a preempted worker): every rank stops at the same step, rank 0
    saves, torchrun exits 0, and the run resumes from that step."""
    out = str(tmp_path / "out")
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = start_ddp(out, char_data, log)
        try:
            pids = worker_pids(proc.pid)
            assert sorted(pids) == [0, 1], pids
            os.kill(pids[1], signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            kill_tree(proc)
    text = log_path.read_text()
    assert rc == 0, text[-3000:]
    assert text.count("SIGTERM: saving after this step") == 1
    ckpt = load_ckpt(out)
    last = last_logged_iter(out)
    assert ckpt["iter_num"] == last + 1
    assert len(ckpt["rng"]) == 2
    n = ckpt["iter_num"]
    p = run_torchrun(2, out, char_data, init_from="resume", **dict(LONG, max_iters=n + 2))
    first = next(line for line in p.stdout.splitlines() if line.startswith("iter "))
    assert first.startswith(f"iter {n}:"), first
    steps, _ = unique_history(out)
    assert sorted(steps) == list(range(n + 2))


def test_sigterm_to_torchrun(tmp_path, char_data):
    """torchrun forwards SIGTERM to every worker; they save at one step. torchrun itself then
    exits non-zero (its agent raises SignalException), which is torchrun's behaviour, not ours."""
    out = str(tmp_path / "out")
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = start_ddp(out, char_data, log)
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            kill_tree(proc)
    text = log_path.read_text()
    assert text.count("SIGTERM: saving after this step") == 2, text[-3000:]
    assert load_ckpt(out)["iter_num"] == last_logged_iter(out) + 1
    assert 'train.py", line' not in text
