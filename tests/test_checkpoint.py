"""
gpt_trainer/checkpoint.py: one run per out_dir (a lock that dies with its process), no run
starting over another's checkpoints unless told, atomic saves that a full disk cannot tear,
optimizer state mapped by parameter name (nanoGPT's checkpoints included), and a checkpoint
that cannot be used reported in one line. Whole runs: test_run_safety.py.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainutil import REPO, FullDisk, kill_tree, small_fsize

from gpt_trainer import checkpoint
from gpt_trainer import optim
from gpt_trainer.errors import CheckpointError
from model import GPT, GPTConfig


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


@pytest.mark.parametrize("content", [np.arange(3000, dtype=np.uint16).tobytes(), b"First Citizen:\nBefore we proceed"])
def test_a_file_that_is_no_checkpoint_is_not_called_one_with_objects(tmp_path, content):
    """A token file or text given as --ckpt: weights_only's unpickler refuses it as it refuses a
    pickled object, but it holds none, and the line says what it is."""
    path = tmp_path / "train.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{path} cannot be read as a checkpoint \(Unsupported operand \d+\); "
                                              r"it is truncated, corrupt or not a checkpoint"):
        checkpoint.load_checkpoint(str(path))


SAVE_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from gpt_trainer import checkpoint
try:
    checkpoint.save_checkpoint({{"model": {{"w": torch.randn(100_000)}}, "iter_num": 2}}, {path!r})
except checkpoint.CheckpointError as e:
    print(f"error: {{e}}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("room", [0, 5000, pytest.param("ulimit", marks=pytest.mark.slow)])
def test_checkpoint_full_disk_says_so(tmp_path, monkeypatch, room):
    """A disk full before or during the write (ENOSPC, simulated), and the kernel's file size
    limit (EFBIG, real, in a child process): one line, the old checkpoint intact, no temp file."""
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint({"model": {"w": torch.ones(10)}, "iter_num": 1}, path)
    before = open(path, "rb").read()
    if room == "ulimit":
        p = subprocess.run([sys.executable, "-c", SAVE_SCRIPT.format(repo=REPO, path=path)],
                           capture_output=True, text=True, preexec_fn=small_fsize, timeout=120)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr == (f"error: could not write {path}: file too large (the file size limit, ulimit -f, "
                            f"or the filesystem's); the previous checkpoint is kept\n")
    else:
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
