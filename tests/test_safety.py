"""
Never lose a run: one run per out_dir (a lock that dies with its process), no run starting over
another's checkpoints unless told, optimizer state mapped by parameter name (nanoGPT's
checkpoints included), damaged metrics.jsonl lines and full disks reported as one line, and a
dead rank under torchrun named in one line with the checkpoint that is intact.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from trainutil import (REPO, TRAIN, char_data, child_env, kill_tree, last_logged_iter,  # noqa: F401
                       load_ckpt, one_error_line, popen_train, read_metrics, run_train, step_losses, torchrun_cmd,
                       train_args, wait_for)

from gpt_trainer import checkpoint
from gpt_trainer import metrics
from gpt_trainer import optim
from gpt_trainer.checkpoint import CheckpointError
from configurator import ConfigError, UserError
from model import GPT, GPTConfig
from gpt_trainer.runtime import resolve_device

SAMPLE = os.path.join(REPO, "sample.py")


@pytest.fixture
def release_locks():
    """Locks this test process took, released afterwards (a run holds its lock until it exits)."""
    yield
    for path in list(checkpoint._locks):
        checkpoint._locks.pop(path).close()


# -----------------------------------------------------------------------------
# one run per out_dir

HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from gpt_trainer import checkpoint
checkpoint.lock_out_dir({out!r})
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_names_its_holder_and_dies_with_it(tmp_path, release_locks):
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(repo=REPO, out=out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError) as e:
            checkpoint.lock_out_dir(out)
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(e.value)
        assert "another --out_dir" in str(e.value)
    finally:
        kill_tree(holder)  # kill -9: the kernel releases the lock
    checkpoint.lock_out_dir(out)
    assert f"pid {os.getpid()} on" in open(os.path.join(out, ".lock")).read()


def test_out_dir_naming_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        checkpoint.claim_out_dir(str(path), "scratch", False)
    assert path.read_text() == "mine"


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temps_only_of_writers_no_live_process_owns(tmp_path, release_locks):
    """Without the directory's lock only this host's dead writers' temps go; holding it, all do."""
    path = str(tmp_path / "ckpt.pt")
    host = socket.gethostname()
    temps = {"dead": f".ckpt.pt.tmp-{dead_pid()}@{host}", "old-dead": f".ckpt.pt.tmp{dead_pid()}",
             "live": f".ckpt.pt.tmp-{os.getppid()}@{host}", "elsewhere": f".ckpt.pt.tmp-1@{host}-other"}
    for name in temps.values():
        (tmp_path / name).write_bytes(b"partial")
    checkpoint.remove_stale_temps(path)
    assert sorted(os.listdir(tmp_path)) == sorted([temps["live"], temps["elsewhere"]])
    checkpoint.lock_out_dir(str(tmp_path))  # every writer of a locked out_dir holds its lock
    checkpoint.remove_stale_temps(path)
    assert sorted(os.listdir(tmp_path)) == [".lock"]


def touch(out, *names):
    os.makedirs(out, exist_ok=True)
    for name in names:
        if name == "ckpt_dcp":
            os.makedirs(os.path.join(out, "ckpt_dcp", "iter_00000004"))
            open(os.path.join(out, "ckpt_dcp", "latest"), "w").write("iter_00000004")
        else:
            open(os.path.join(out, name), "w").write("earlier run")


@pytest.mark.parametrize("found", ["ckpt.pt", "ckpt_dcp", "best.pt"])
@pytest.mark.parametrize("init_from", ["scratch", "gpt2"])
def test_no_run_starts_over_another_runs_checkpoint(tmp_path, found, init_from, release_locks):
    out = str(tmp_path / "out")
    touch(out, found, "metrics.jsonl")
    with pytest.raises(CheckpointError) as e:
        checkpoint.claim_out_dir(out, init_from, overwrite=False)
    message = str(e.value)
    assert found in message and out in message
    for offer in ("--init_from=resume", "--init_from=auto", "another --out_dir", "--overwrite=True"):
        assert offer in message
    assert sorted(os.listdir(out)) == sorted([".lock", found, "metrics.jsonl"])
    assert open(os.path.join(out, "metrics.jsonl")).read() == "earlier run"


def test_claim_resolves_auto_and_allows_overwrite(tmp_path, release_locks):
    cases = [((), "auto", False, False, "scratch"), (("ckpt.pt",), "auto", False, False, "resume"),
             (("ckpt_dcp",), "auto", True, False, "resume"), (("ckpt.pt",), "resume", False, False, "resume"),
             (("ckpt.pt", "best.pt"), "scratch", False, True, "scratch"),
             (("best.pt",), "auto", False, False, "scratch")]  # its own best.pt, before its first ckpt.pt
    for i, (files, init_from, fsdp, overwrite, expected) in enumerate(cases):
        out = str(tmp_path / str(i))
        touch(out, *files)
        assert checkpoint.claim_out_dir(out, init_from, overwrite, fsdp) == expected, (files, init_from)
    with pytest.raises(CheckpointError, match="ckpt_dcp"):  # a sharded run's resume point, not this kind's
        checkpoint.claim_out_dir(str(tmp_path / "2"), "auto", False, fsdp=False)


def test_start_over_leaves_nothing_of_the_earlier_run(tmp_path, capsys):
    out = str(tmp_path)
    touch(out, "ckpt.pt", "best.pt", "ckpt_dcp", "metrics.jsonl", "notes.txt")
    checkpoint.start_over(out)
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert "removed ckpt.pt, best.pt, ckpt_dcp, metrics.jsonl" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# optimizer state by parameter name

# nanoGPT's train.py (karpathy/nanoGPT, bias=False, 2 layers) writes ckpt.pt with these keys, its
# model's state_dict in this order (lm_head.weight tied to wte), '_orig_mod.' before each name when
# compiled, and one AdamW whose state_dict has two groups: the >= 2-D parameters, then the others,
# each in named_parameters order (the state_dict's without lm_head.weight)
NANOGPT_KEYS = ["model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"]
NANOGPT_BLOCK = ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
                 "mlp.c_proj.weight"]
NANOGPT_CONFIG = dict(out_dir="out", eval_interval=3, log_interval=1, eval_iters=2, eval_only=False,
                      always_save_checkpoint=False, init_from="scratch", wandb_log=False,
                      wandb_project="shakespeare-char", wandb_run_name="mini-gpt", dataset="shakespeare_char",
                      gradient_accumulation_steps=1, batch_size=4, block_size=32, n_layer=2, n_head=2,
                      n_embd=32, dropout=0.0, bias=False, learning_rate=1e-3, max_iters=3, weight_decay=0.1,
                      beta1=0.9, beta2=0.99, grad_clip=1.0, decay_lr=True, warmup_iters=100,
                      lr_decay_iters=5000, min_lr=1e-4, backend="nccl", device="cpu", dtype="float16",
                      compile=True)


def nanogpt_checkpoint(vocab_size, iters=3):
    """(checkpoint, nanoGPT's optimizer, its parameter names in optimizer order) after `iters`
    AdamW steps, laid out as nanoGPT writes it. block_size == n_embd, as in the run it was checked
    against: wpe then has the shape of the c_proj weights, so only names can tell them apart."""
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=vocab_size, dropout=0.0)
    model = GPT(GPTConfig(**args))
    order = (["transformer.wte.weight", "transformer.wpe.weight"]
             + [f"transformer.h.{i}.{name}" for i in range(2) for name in NANOGPT_BLOCK]
             + ["transformer.ln_f.weight", "lm_head.weight"])
    params = dict(model.named_parameters())
    named = [n for n in order if n != "lm_head.weight"]
    decay, nodecay = [n for n in named if params[n].dim() >= 2], [n for n in named if params[n].dim() < 2]
    opt = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": 0.1},
                             {"params": [params[n] for n in nodecay], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    for _ in range(iters):
        x = torch.randint(0, vocab_size, (4, 32))
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = model.state_dict()
    ckpt = {"model": {"_orig_mod." + n: state[n] for n in order}, "optimizer": opt.state_dict(),
            "model_args": args, "iter_num": iters, "best_val_loss": torch.tensor(4.17),
            "config": NANOGPT_CONFIG}
    assert list(ckpt) == NANOGPT_KEYS and set(order) == set(state)
    return ckpt, opt, decay + nodecay


def resume_in_process(path, optimizer="adamw"):
    """What train.py does with a resume point, in this process: (model, optimizers)."""
    ckpt = checkpoint.load_resume_point(os.path.dirname(path))
    model = checkpoint.build_model(ckpt, path)
    opts = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu", optimizer)
    checkpoint.load_optimizers(ckpt, path, model, opts)
    return model, opts


def test_nanogpt_optimizer_state_maps_by_name(tmp_path):
    ckpt, nano_opt, nano_names = nanogpt_checkpoint(vocab_size=65)
    path = str(tmp_path / "ckpt.pt")
    torch.save(ckpt, path)
    model, (opt,) = resume_in_process(path)
    params = dict(model.named_parameters())
    nano_params = [p for g in nano_opt.param_groups for p in g["params"]]
    nano_state = {n: nano_opt.state[p] for n, p in zip(nano_names, nano_params)}
    assert [n for g in checkpoint.param_names(model, opt) for n in g] != nano_names, "the orders differ"
    for name, expected in nano_state.items():
        got = opt.state[params[name]]
        assert set(got) == {"step", "exp_avg", "exp_avg_sq"}
        for key in got:
            assert torch.equal(got[key], expected[key]), (name, key)
    assert opt.param_groups[0]["fused"] and opt.param_groups[0]["betas"] == (0.9, 0.99)
    x = torch.randint(0, 65, (4, 32))
    model(x, x)[1].backward()
    opt.step()  # fused AdamW on the mapped state
    assert all(torch.isfinite(p).all() for p in model.parameters())


def our_checkpoint(tmp_path, optimizer="adamw"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32))
    opts = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer)
    x = torch.randint(0, 32, (2, 16))
    model(x, x)[1].backward()
    for opt in opts:
        opt.step()
    from dataclasses import asdict
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config), "iter_num": 1,
            "optimizer": [checkpoint.named_state_dict(model, opt) for opt in opts]}
    path = str(tmp_path / "ckpt.pt")
    torch.save(ckpt, path)
    return ckpt, path, model, opts


def test_saved_optimizer_state_carries_names_and_round_trips(tmp_path):
    ckpt, path, model, opts = our_checkpoint(tmp_path, "muon")
    groups = [g for state in ckpt["optimizer"] for g in state["param_groups"]]
    assert all(len(g["param_names"]) == len(g["params"]) for g in groups)
    assert sorted(n for g in groups for n in g["param_names"]) == sorted(dict(model.named_parameters()))
    resumed, new_opts = resume_in_process(path, "muon")
    for opt, new in zip(opts, new_opts):
        for group, new_group in zip(opt.param_groups, new.param_groups):
            for p, q in zip(group["params"], new_group["params"]):
                assert all(torch.equal(opt.state[p][k], new.state[q][k]) for k in opt.state[p])


def test_optimizer_state_that_does_not_fit_is_one_error(tmp_path):
    ckpt, path, model, _ = our_checkpoint(tmp_path)
    state = ckpt["optimizer"][0]
    names = [n for g in state["param_groups"] for n in g["param_names"]]
    i = names.index("transformer.wpe.weight")
    state["state"][i]["exp_avg"] = torch.zeros(3, 16)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"'exp_avg' of transformer.wpe.weight has shape \(3, 16\)"):
        resume_in_process(path)
    state["state"][i]["exp_avg"] = torch.zeros(16, 16)
    state["param_groups"][0]["param_names"][0] = "transformer.h.7.attn.c_attn.weight"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="other parameters than this model's"):
        resume_in_process(path)


def test_checkpoint_without_iter_num_is_one_error(tmp_path):
    ckpt, path, _, _ = our_checkpoint(tmp_path)
    del ckpt["iter_num"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=f"{path} has no valid 'iter_num'"):
        checkpoint.load_resume_point(str(tmp_path))


# -----------------------------------------------------------------------------
# one clear line instead of a traceback or wrong words

class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_with_objects_does_not_advise_weights_only_false(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": {}, "model_args": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_checkpoint(path)
    assert path in str(e.value) and "posix.getcwd" in str(e.value)
    assert "weights_only" not in str(e.value).replace("see torch.load weights_only", "")


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


@pytest.mark.parametrize("room", [0, 5000])
def test_checkpoint_full_disk_says_so(tmp_path, monkeypatch, room):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint({"model": {"w": torch.ones(10)}, "iter_num": 1}, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(checkpoint, "open", lambda p, mode: FullDisk(p, mode, room), raising=False)
    with pytest.raises(CheckpointError) as e:
        checkpoint.save_checkpoint({"model": {"w": torch.randn(100_000)}, "iter_num": 2}, path)
    assert str(e.value) == f"could not write {path}: no space left on device; the previous checkpoint is kept"
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_last_saved_names_a_checkpoint_that_exists(tmp_path):
    out = str(tmp_path)
    assert checkpoint.last_saved(out) == f"no checkpoint has been written to {out} yet"
    checkpoint.save_checkpoint({"model": {"w": torch.ones(1)}, "iter_num": 12}, os.path.join(out, "ckpt.pt"))
    assert checkpoint.last_saved(out).startswith(f"{out}/ckpt.pt (iter 12) is intact")
    assert checkpoint.last_saved(out, fsdp=True) == f"no checkpoint has been written to {out} yet"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", "gpu"])
def test_a_device_this_machine_lacks_is_one_error(device):
    kind = torch.device(device).type if device != "gpu" else "gpu"
    if kind == "cuda" and torch.cuda.is_available() or kind == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    with pytest.raises(ConfigError, match=f"device={device!r}"):
        resolve_device(device)


# -----------------------------------------------------------------------------
# metrics.jsonl: a damaged line never blocks a resume; a full disk is one line

GOOD = ['{"iter": 0, "loss": 4.0}\n', '{"iter": 1, "loss": 3.9}\n', '{"iter": 2, "loss": 3.8}\n']


@pytest.mark.parametrize("damage", ["not json\n", "\0" * 300, "[1, 2]\n", '{"iter": "3"}\n', '{"iter": 3, "lo'])
def test_damaged_metrics_lines_are_dropped_with_one_warning(tmp_path, capsys, damage):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines([GOOD[0], damage if damage.endswith("\n") else "", GOOD[1], GOOD[2], damage])
    assert metrics.read_metrics(str(tmp_path)) == [json.loads(line) for line in GOOD]
    metrics.truncate_metrics(path, 2)
    assert open(path).read() == GOOD[0] + GOOD[1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 2 and warnings[0] == warnings[1]  # read, then truncate
    numbers = "lines 2, 5" if damage.endswith("\n") else "line 4"
    assert warnings[0].startswith(f"warning: {path}: dropped") and warnings[0].endswith(f"({numbers})")
    metrics.truncate_metrics(path, 2)  # nothing left to drop: not rewritten, no warning
    assert capsys.readouterr().err == ""


def test_metrics_full_disk_is_one_line(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    open(path, "w").writelines(GOOD + ['{"iter": 3, "loss": 3.7}\n'])
    before = open(path).read()
    def full_disk_open(p, mode="r", **kw):
        return FullDisk(p, mode, 0) if "w" in mode or "a" in mode else open(p, mode, **kw)
    monkeypatch.setattr(metrics, "open", full_disk_open, raising=False)
    with pytest.raises(UserError) as e:
        metrics.append_metrics(path, {"iter": 4, "loss": 3.6})
    assert str(e.value).startswith(f"could not append to {path}: no space left on device; "
                                   f"the records before iter 4")
    with pytest.raises(UserError) as e:  # at resume
        metrics.truncate_metrics(path, 3)
    assert "no space left on device" in str(e.value) and "unchanged" in str(e.value)
    assert open(path).read() == before
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


# -----------------------------------------------------------------------------
# whole runs


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
    from test_ddp import worker_pids
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
