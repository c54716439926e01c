"""
Distributed training is equivalent to one process (issue 6): the same global batches for
any world size, eval that does not depend on it, FSDP2 matching DDP and resuming exactly,
resumes across world sizes, two nodes over loopback, and a missing peer that times out.
All real torchrun processes on the CPU with gloo.
"""
import os
import subprocess
import sys
import time

import pytest
import torch

from trainutil import (REPO, TRAIN, char_data, child_env, eval_losses, free_port,  # noqa: F401
                       read_metrics, run_torchrun, run_train, step_losses, train_args)

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
    run_train(one, char_data, **RUN)
    run_torchrun(2, two, char_data, **RUN)
    procs = [subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for cmd in two_node_cmds(nodes, char_data, **RUN)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "world size 2" in outs[0]
    assert_close_runs(one, two)
    assert_close_runs(one, nodes)


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
