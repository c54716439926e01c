"""
Distributed training (gloo, real torchrun processes on the CPU) is equivalent to one process
(issue 6): the same global batches for any world size, eval that does not depend on it, FSDP2
matching DDP and resuming exactly, resumes across world sizes and bitwise at the same one,
two nodes over loopback, rank 0 alone writing, one clear error for a bad setting or a missing
peer, and a SIGTERM to any rank stopping every rank at the same step with a checkpoint.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainutil import (REPO, TRAIN, char_data, child_env, eval_losses, free_port, kill_tree,  # noqa: F401
                       last_logged_iter, load_ckpt, read_metrics, run_torchrun, run_train, step_losses,
                       torchrun_cmd, train_args, unique_history, wait_for, worker_pids)

pytestmark = pytest.mark.slow  # every test here runs torchrun

# 4 global micro-batches per step: 1 process x 4, 2 processes x 2, 2 nodes x 1 process x 2
RUN = dict(gradient_accumulation_steps=4, max_iters=20, eval_interval=10, eval_iters=5,
           warmup_iters=5, lr_decay_iters=20, learning_rate=3e-3, ckpt_interval=1000, dropout=0.0)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_close_runs(out_a, out_b, rel=1e-5):
    """Per-step losses and eval losses within rel, and final weights within rel (in norm)."""
    a, b = read_metrics(out_a), read_metrics(out_b)
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(RUN["max_iters"]))
    for it in la:
        assert abs(la[it] - lb[it]) <= rel * abs(la[it]), (it, la[it], lb[it])
    ea, eb = eval_losses(a), eval_losses(b)
    assert sorted(ea) == sorted(eb) and len(ea) == 3
    for it in ea:
        for x, y in zip(ea[it], eb[it]):
            assert abs(x - y) <= rel * abs(x), (it, ea[it], eb[it])
    wa, wb = weights(os.path.join(out_a, "ckpt.pt")), weights(os.path.join(out_b, "ckpt.pt"))
    assert sorted(wa) == sorted(wb)
    diff = torch.sqrt(sum(((wa[k] - wb[k]) ** 2).sum() for k in wa))
    norm = torch.sqrt(sum((wa[k] ** 2).sum() for k in wa))
    assert diff <= rel * norm, (diff / norm).item()


def two_node_cmds(out_dir, data_dir, **overrides):
    """Two torchrun agents, one per simulated node, meeting over loopback."""
    port = free_port()
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
             "--rdzv-conf=timeout=60", TRAIN, *train_args(out_dir, data_dir, **overrides)]
            for node in (0, 1)]


def test_world_size_invariance_one_process_two_processes_two_nodes(tmp_path, char_data):
    one, two, nodes = (str(tmp_path / n) for n in ("one", "two", "nodes"))
    assert "world size 1, 4 micro-steps per rank" in run_train(one, char_data, **RUN).stdout
    assert "world size 2, 2 micro-steps per rank" in run_torchrun(2, two, char_data, **RUN).stdout
    procs = [subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for cmd in two_node_cmds(nodes, char_data, **RUN)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "world size 2" in outs[0]
    assert_close_runs(one, two)
    assert_close_runs(one, nodes)
    a, b = load_ckpt(one), load_ckpt(two)
    assert a["world_size"] == 1 and b["world_size"] == 2 and len(b["rng"]) == 2  # every rank's RNG
    losses = step_losses(read_metrics(one))
    assert losses[RUN["max_iters"] - 1] < losses[0] - 0.1  # trained: the agreement is not trivial


def test_eval_loss_does_not_depend_on_world_size(tmp_path, char_data):
    # 7 eval batches do not split evenly over 2 ranks: the padding must not count
    run_train(str(tmp_path / "e1"), char_data, eval_only=True, eval_iters=7, gradient_accumulation_steps=2)
    run_torchrun(2, str(tmp_path / "e2"), char_data, eval_only=True, eval_iters=7, gradient_accumulation_steps=2)
    e1, e2 = eval_losses(read_metrics(str(tmp_path / "e1"))), eval_losses(read_metrics(str(tmp_path / "e2")))
    assert list(e1) == list(e2) == [0]
    for x, y in zip(e1[0], e2[0]):
        assert abs(x - y) <= 1e-6 * x


def test_fsdp_matches_ddp_and_resumes_exactly(tmp_path, char_data):
    ddp, fsdp, resumed = (str(tmp_path / n) for n in ("ddp", "fsdp", "resumed"))
    run_torchrun(2, ddp, char_data, **RUN)
    run_torchrun(2, fsdp, char_data, fsdp=True, **RUN)
    run_torchrun(2, resumed, char_data, fsdp=True, **dict(RUN, max_iters=7))
    run_torchrun(2, resumed, char_data, fsdp=True, init_from="resume", **RUN)
    assert os.path.exists(os.path.join(fsdp, "ckpt_dcp", "latest"))
    assert step_losses(read_metrics(fsdp)) == step_losses(read_metrics(resumed))  # bitwise
    for out in (fsdp, resumed):
        p = subprocess.run([sys.executable, "export.py", f"--consolidate={out}"], cwd=REPO,
                           capture_output=True, text=True, env=child_env())
        assert p.returncode == 0, p.stderr
    wf, wr = weights(os.path.join(fsdp, "ckpt.pt")), weights(os.path.join(resumed, "ckpt.pt"))
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert_close_runs(ddp, fsdp)


def test_resume_across_world_sizes_keeps_the_data_order(tmp_path, char_data):
    straight, two_to_one, one_to_two = (str(tmp_path / n) for n in ("straight", "21", "12"))
    run_train(straight, char_data, **RUN)
    run_torchrun(2, two_to_one, char_data, **dict(RUN, max_iters=8))
    p = run_train(two_to_one, char_data, init_from="resume", **RUN)
    assert "RNG states for 2 rank(s)" in p.stderr
    run_train(one_to_two, char_data, **dict(RUN, max_iters=8))
    run_torchrun(2, one_to_two, char_data, init_from="resume", **RUN)
    assert_close_runs(straight, two_to_one)
    assert_close_runs(straight, one_to_two)


def test_total_batch_size_in_tokens(tmp_path, char_data):
    # 4 micro-steps of 8 x 32 tokens, given as tokens instead of micro-steps: identical run
    steps, tokens = str(tmp_path / "steps"), str(tmp_path / "tokens")
    quick = dict(RUN, max_iters=4, eval_interval=1000)
    run_train(steps, char_data, **quick)
    run_train(tokens, char_data, **dict(quick, gradient_accumulation_steps=1, total_batch_size=4 * 8 * 32))
    assert step_losses(read_metrics(steps)) == step_losses(read_metrics(tokens))
    p = run_torchrun(2, str(tmp_path / "bad"), char_data, check=False,
                     **dict(quick, total_batch_size=3 * 8 * 32))
    assert p.returncode != 0
    assert "error: total_batch_size=768 is not a multiple of" in p.stdout + p.stderr


def test_missing_peer_times_out_with_a_clear_error(tmp_path, char_data):
    node0 = two_node_cmds(str(tmp_path / "out"), char_data, **RUN)[0]
    node0 = [a.replace("timeout=60", "timeout=5") for a in node0]
    t0 = time.time()
    p = subprocess.run(node0, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert time.time() - t0 < 60
    assert "Timed out" in p.stderr and "1/2 clients joined" in p.stderr


# -----------------------------------------------------------------------------
# DDP: rank 0 writes, bitwise resume, errors and signals

COMPARE = dict(gradient_accumulation_steps=4, max_iters=8, eval_interval=4, warmup_iters=2,
               lr_decay_iters=8, learning_rate=3e-3, min_lr=3e-4)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, char_data):
    out = str(tmp_path_factory.mktemp("ddp") / "out")
    p = run_torchrun(2, out, char_data, **COMPARE)
    return out, p


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
