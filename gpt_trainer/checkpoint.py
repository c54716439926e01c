"""
Checkpoints that survive a kill -9 at any moment and load without unpickling code.

A checkpoint is a dict of tensors and plain Python types, with nanoGPT's keys (model,
optimizer, model_args, iter_num, best_val_loss, config) plus what an exact resume needs
(scaler, rng per rank, data sampler state, the optimizer's parameter names). Files are
written to a temporary file in the same directory, fsynced, then renamed over the old one, so
the old or the new checkpoint exists at every instant, never a half-written one.

A training run owns its out_dir while it runs (a lock), never starts over another run's
checkpoints unless told to, and saves and restores its resume point through the functions
below, which take everything they use as arguments.
"""
import os
import pickle
import random
import shutil
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist

from gpt_trainer import nanogpt
from gpt_trainer.dirlock import _locks, lock_dir  # noqa: F401 (_locks: the tests release them)
from gpt_trainer.errors import CheckpointError
from gpt_trainer.fsutil import fsync_dir, write_failure
from gpt_trainer.metrics import METRICS
from gpt_trainer.runtime import full_state_dict
from model import GPT, GPTConfig


# -----------------------------------------------------------------------------
# the files of a run's out_dir, named here only (metrics.jsonl is metrics.py's)

CKPT = "ckpt.pt"  # the latest state: what a resume reads
BEST = "best.pt"  # the weights with the best val loss (always_save_checkpoint=False)
SHARDED = "ckpt_dcp"  # FSDP2's sharded checkpoints: iter_N/ steps and a `latest` pointer
LOCK = ".lock"  # held by the run that owns out_dir


def ckpt_path(out_dir):
    return os.path.join(out_dir, CKPT)


def best_path(out_dir):
    return os.path.join(out_dir, BEST)


def inference_path(out_dir, ckpt="auto"):
    """The checkpoint to sample or evaluate: ckpt when given, else best.pt (written only when it
    beat every earlier eval) when it exists, else ckpt.pt."""
    if ckpt != "auto":
        return ckpt
    return best_path(out_dir) if os.path.exists(best_path(out_dir)) else ckpt_path(out_dir)


def assert_finite(state_dict, path):
    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"not writing {path}: weight {name} holds NaN/inf; "
                                  f"the previous checkpoint is kept")


# -----------------------------------------------------------------------------
# out_dir ownership: one run at a time, and a run that does not resume never starts over
# another run's checkpoints unless told to

def lock_out_dir(out_dir):
    """Make out_dir this process's alone: flock on out_dir/.lock, which the kernel releases when
    the process ends in any way (kill -9 included), so no lock outlives its run. The holder's
    pid, host and start time are written into the file for the next run's error message."""
    return lock_dir(out_dir, CheckpointError, "out_dir", "run")


def resume_point(out_dir, fsdp=False):
    """The checkpoint this kind of run resumes from in out_dir (ckpt.pt; the sharded ckpt_dcp
    with fsdp), or None."""
    if fsdp:
        return os.path.join(out_dir, SHARDED) if sharded_dir(out_dir) else None
    path = ckpt_path(out_dir)
    return path if os.path.exists(path) else None


def check_start(out_dir, init_from, overwrite, fsdp=False):
    """init_from with 'auto' resolved, after refusing to start over another run's checkpoints:
    a run that does not resume needs an out_dir without ckpt.pt, ckpt_dcp and best.pt, or
    overwrite=True. 'auto' that finds no resume point takes a best.pt alone for its own (written
    before its first ckpt.pt, then killed) and starts over it."""
    auto = init_from == "auto"
    if auto:
        init_from = "resume" if resume_point(out_dir, fsdp) else "scratch"
    if init_from == "resume" or overwrite:
        return init_from
    found = [name for name in (CKPT, BEST) if os.path.exists(os.path.join(out_dir, name))]
    found += [SHARDED] if sharded_dir(out_dir) else []  # a complete one: a torn first save is no run
    if found and not (auto and found == [BEST]):
        raise CheckpointError(f"{out_dir} already holds {found[0]} and init_from="
                              f"{'auto' if auto else init_from!r} would start over it; continue it with "
                              f"--init_from=resume (or --init_from=auto), pick another --out_dir, or "
                              f"replace it with --overwrite=True")
    return init_from


def claim_out_dir(out_dir, init_from, overwrite, fsdp=False):
    """Every rank calls this before anything is written: rank 0 locks out_dir and checks what is
    in it, then every rank gets rank 0's answer, so all go on or all stop with the same error."""
    answer = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            lock_out_dir(out_dir)
            answer = ("ok", check_start(out_dir, init_from, overwrite, fsdp))
        except CheckpointError as e:
            answer = ("error", str(e))
    if dist.is_initialized():
        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    if answer[0] == "error":
        raise CheckpointError(answer[1])
    return answer[1]


def start_over(out_dir):
    """Remove what an earlier run left (claim_out_dir allowed it): nothing in out_dir may then be
    mistaken for this run's, such as a best.pt that sample.py would prefer over the new ckpt.pt."""
    removed = []
    for name in (CKPT, BEST, SHARDED, METRICS):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    if removed:
        print(f"removed {', '.join(removed)} of an earlier run from {out_dir}")


def last_saved(out_dir, fsdp=False):
    """'out/ckpt.pt (iter 12) is intact; ...' for out_dir's resume point, for error messages."""
    path = resume_point(out_dir, fsdp)
    if path is None:
        return f"no checkpoint has been written to {out_dir} yet"
    try:
        if path.endswith(SHARDED):
            it = int(os.path.basename(sharded_dir(out_dir)).removeprefix("iter_"))
        else:
            it = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iter_num"]
        return f"{path} (iter {it}) is intact; resume with --init_from=resume"
    except Exception:  # only words for a message: the path alone will do
        return f"{path} is the last checkpoint"


def temp_name(path):
    """The writer's temp file: hidden, beside `path`, named after the writer (pid and host), so
    clean-up can tell a killed writer's leftover from a live writer's file."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}@{socket.gethostname()}")


def writer_alive(owner):
    """Whether the writer a temp file is named after ('PID@HOST', or 'PID' from older
    versions) may still be writing it."""
    pid, _, host = owner.partition("@")
    if not pid.isdigit() or host not in ("", socket.gethostname()):
        return True  # another host's process: nothing here can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def remove_stale_temps(path):
    """Temp files left by writers killed mid-save (never mistaken for checkpoints, but they hold
    disk space). Only those no live process owns go: all of them while this process holds the
    directory's lock (every writer of an out_dir holds it), else those of dead writers on this host."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.tmp"
    locked = os.path.realpath(directory) in _locks
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and (locked or not writer_alive(entry[len(prefix):].lstrip("-"))):
            try:
                os.remove(os.path.join(directory, entry))
            except FileNotFoundError:
                pass


def save_checkpoint(state, path):
    """Atomically write `state` to `path`. A failed write (full disk, permissions) leaves the
    previous file untouched and raises CheckpointError."""
    assert_finite(state.get("model", {}), path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temp_name(path)
    remove_stale_temps(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)  # make the rename itself durable
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous checkpoint is kept" if os.path.exists(path) else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write {path}: {write_failure(e)}; {kept}")


def strip_prefixes(state_dict):
    # torch.compile wraps the model as _orig_mod, DDP as module; old nanoGPT files kept them
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def refused_object(e):
    """(the Python object torch.load(weights_only=True) refused to build, or None, and why it
    stopped): with none named the file is no pickle at all (e.g. a train.bin given as one)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    found = next((line for line in lines if "GLOBAL" in line or "global" in line), None)
    # torch's own reason follows its "WeightsUnpickler error:" line
    reason = next((lines[i + 1] for i, x in enumerate(lines[:-1]) if "WeightsUnpickler" in x), "not a pickle")
    return found, reason[:200]


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True: a file someone handed you cannot run code."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} not found; train first or point --out_dir/--ckpt at a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, i.e. running whatever the file holds
        found, reason = refused_object(e)
        if found:
            raise CheckpointError(f"{path} holds Python objects other than tensors and plain types "
                                  f"({found}), so it was not loaded; a checkpoint of this project or "
                                  f"nanoGPT never does")
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({reason}); it is truncated, "
                              f"corrupt or not a checkpoint of this project")
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({reason}); it is truncated, "
                              f"corrupt or not a checkpoint of this project")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model'/'model_args')")
    ckpt["model"] = strip_prefixes(ckpt["model"])
    return ckpt


def model_config(model_args, path):
    known = set(GPTConfig.field_names())
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise CheckpointError(f"{path}: model_args has unknown field(s) {unknown}; it was written "
                              f"by a newer or different version")
    try:
        return GPTConfig(**model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_args are invalid ({e})")


def build_model(ckpt, path, dropout=None):
    """The GPT a checkpoint describes (ours, or nanoGPT's: see gpt_trainer/nanogpt.py), with its weights
    loaded (dropout may be overridden)."""
    args = nanogpt.config_fields(ckpt)
    if dropout is not None:
        args["dropout"] = dropout
    if ckpt.get("lora"):
        raise CheckpointError(f"{path} holds LoRA adapters only; build it with gpt_trainer.loading.build_any_model, "
                              f"which rebuilds its base")
    model = GPT(model_config(args, path))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{path}: weights do not fit model_args ({first})")
    return model




def capture_rng():
    """Every RNG state the training step may draw from, as tensors and plain types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# a training run's resume point: what train.py saves and restores, with explicit arguments

def load_resume_point(out_dir, fsdp=False):
    """out_dir's resume point (ckpt.pt; ckpt_dcp with fsdp), with every key a resume needs checked."""
    if fsdp:
        path, ckpt = os.path.join(out_dir, SHARDED), load_sharded_state(out_dir)
    else:
        path = ckpt_path(out_dir)
        ckpt = load_checkpoint(path)
        if "optimizer" not in ckpt:
            raise CheckpointError(f"{path} has no optimizer state (written as best.pt or by consolidate), "
                                  f"so it cannot resume; use it with sample.py")
    for key, kind in (("iter_num", int), ("model_args", dict)):
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise CheckpointError(f"{path} has no valid {key!r} ({ckpt.get(key)!r}), so it cannot resume; "
                                  f"it was not written by train.py (this project's or nanoGPT's)")
    ckpt["best_val_loss"] = float(ckpt.get("best_val_loss", 1e9))  # nanoGPT saves a 0-d tensor
    for name, t in ckpt.get("model", {}).items():  # (sharded weights are checked when they are written)
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: weight {name} holds NaN/inf, so training cannot continue from it; "
                                  f"resume from an earlier checkpoint or start over in another out_dir")
    return ckpt


def param_names(model, opt):
    """For each of opt's parameter groups, its parameters' names in model."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in opt.param_groups]


def named_state_dict(model, opt):
    """opt.state_dict() with each group's parameter names under 'param_names' (torch's own key
    for them), so that a resume maps state to parameters by name, never by position. The
    parameters are in nanoGPT's order, so that its train.py, which maps by position, resumes it."""
    state = opt.state_dict()
    rank = {n: i for i, n in enumerate(nanogpt.param_order(n for n, _ in model.named_parameters()))}
    saved, next_id = {}, 0
    for group, names in zip(state["param_groups"], param_names(model, opt)):
        pairs = sorted(zip(group["params"], names), key=lambda pair: rank[pair[1]])
        group["params"], group["param_names"] = [], []
        for old_id, name in pairs:
            if old_id in state["state"]:
                saved[next_id] = state["state"][old_id]
            group["params"].append(next_id)
            group["param_names"].append(name)
            next_id += 1
    state["state"] = saved
    return state


def optimizer_state(model, optimizers):
    """The checkpoint's 'optimizer': one state_dict as nanoGPT saves it, a list for several."""
    states = [named_state_dict(model, opt) for opt in optimizers]
    return states[0] if len(states) == 1 else states


def saved_param_names(saved, ckpt, model, opt):
    """Per group, the names of the parameters of a saved optimizer state, in its order."""
    if all("param_names" in g for g in saved["param_groups"]):
        return [g["param_names"] for g in saved["param_groups"]]
    if nanogpt.written_by_nanogpt(ckpt):
        # nanoGPT's configure_optimizers: the >= 2-D parameters, then the others, each in
        # named_parameters order, which is its state_dict's without the tied lm_head.weight
        weights = {n: t for n, t in ckpt["model"].items() if n != "lm_head.weight"}
        return [[n for n, t in weights.items() if t.dim() >= 2], [n for n, t in weights.items() if t.dim() < 2]]
    return param_names(model, opt)  # this project before names were saved: this code's order


def rekey_optimizer_state(saved, names, opt, model, path):
    """saved (a state_dict over the parameters `names`) for opt, by parameter name, every state
    tensor checked against its parameter's shape: a mismatch is an error, not a crash in a kernel."""
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    flat = [n for group in names for n in group]
    ours = [n for group in param_names(model, opt) for n in group]
    if len(ids) != len(flat) or sorted(flat) != sorted(ours):
        unknown, missing = sorted(set(flat) - set(ours)), sorted(set(ours) - set(flat))
        raise CheckpointError(f"{path}: the optimizer state is for other parameters than this model's "
                              f"(unknown {unknown[:3]}, missing {missing[:3]}); resume with the same model")
    by_name = {n: saved["state"][i] for i, n in zip(ids, flat) if i in saved["state"]}
    params = dict(model.named_parameters())
    state = {}
    for j, name in enumerate(ours):
        if name not in by_name:
            continue  # never stepped: the optimizer initialises it
        entry = dict(by_name[name])
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[name].shape:
                raise CheckpointError(f"{path}: optimizer state {key!r} of {name} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(params[name].shape)}; "
                                      f"the checkpoint does not fit this model")
        if "step" in entry and not torch.is_tensor(entry["step"]):
            entry["step"] = torch.tensor(float(entry["step"]))  # old torch saved a number
        state[j] = entry
    # the groups' settings (lr, betas, weight_decay, ...) are this run's: e.g. a lower lr to recover
    return {"state": state, "param_groups": opt.state_dict()["param_groups"]}


def load_optimizers(ckpt, path, model, optimizers):
    saved = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
    if len(saved) != len(optimizers):
        raise CheckpointError(f"{path}: optimizer state holds {len(saved)} optimizer(s), this run uses "
                              f"{len(optimizers)}; keep optimizer={ckpt.get('config', {}).get('optimizer')!r}")
    for opt, state in zip(optimizers, saved):
        if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
            raise CheckpointError(f"{path}: the optimizer state is not a torch optimizer's state_dict")
        names = saved_param_names(state, ckpt, model, opt)
        opt.load_state_dict(rekey_optimizer_state(state, names, opt, model, path))


def resume_training(ckpt, path, model, optimizers, scaler, loader, fsdp=False):
    """Load a resume point's optimizer, GradScaler, RNG and data-sampler state into this run's
    objects (model: the unwrapped model the optimizers were built on)."""
    if fsdp:
        load_sharded(model, optimizers, os.path.dirname(path))
    else:
        load_optimizers(ckpt, path, model, optimizers)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rng = ckpt.get("rng") or []
    if len(rng) == world_size:
        restore_rng(rng[rank])
    elif rank == 0:
        print(f"note: {path} has RNG states for {len(rng)} rank(s), this run has {world_size}; "
              f"dropout masks will differ from an uninterrupted run", file=sys.stderr)
    if "sampler" in ckpt:
        loader.load_state_dict(ckpt["sampler"])


def write_on_rank0(state, path, device):
    """Rank 0 writes; every rank learns whether it could, so all go on or all stop."""
    ok = torch.ones((), device=device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            save_checkpoint(state, path)
        except CheckpointError as e:
            if not dist.is_initialized():
                raise  # one error line; under DDP the other ranks must hear of it first
            print(f"error: {e}", file=sys.stderr)
            ok.zero_()
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 0:
        raise CheckpointError(f"saving {path} failed (see above); the previous checkpoint is kept")


def saved_weights(model):
    """What a checkpoint keeps of the model: its state, or with LoRA only the adapters."""
    if hasattr(model, "lora"):
        from gpt_trainer.lora import adapter_state_dict
        return adapter_state_dict(model)
    return model.state_dict()


def save_training_state(path, model, optimizers, scaler, sampler, fsdp=False, **progress):
    """The resume point: progress (model_args, iter_num, best_val_loss, config, meta, bad_steps)
    with the weights, optimizer and GradScaler state, the data sampler's state and every rank's
    RNG state. path is ckpt.pt; with fsdp, ckpt_dcp/ beside it. A collective: every rank calls it."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rng = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(rng, capture_rng())
    else:
        rng = [capture_rng()]
    state = dict(progress, scaler=scaler.state_dict(), rng=rng, sampler=sampler, world_size=world_size)
    if fsdp:
        return save_sharded(model, optimizers, state, os.path.dirname(path), dist.get_rank())
    state["model"] = saved_weights(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        state["optimizer"] = optimizer_state(model, optimizers)
    write_on_rank0(state, path, next(model.parameters()).device)


def save_weights(path, model, fsdp=False, **progress):
    """best.pt: the weights and progress, no optimizer (sample.py and export read it). A
    collective under FSDP (the weights are gathered): every rank calls it."""
    state = dict(progress, model=full_state_dict(model, fsdp) if fsdp else saved_weights(model))
    write_on_rank0(state, path, next(model.parameters()).device)


# -----------------------------------------------------------------------------
# FSDP2: sharded checkpoints through torch.distributed.checkpoint (DCP). Every rank writes
# its shards to out_dir/ckpt_dcp/iter_N/ (plus state.pt with the plain-typed resume state
# from rank 0); only then is ckpt_dcp/latest atomically pointed at it, so a kill mid-write
# leaves the previous iter_N in use.

def sharded_dir(out_dir):
    """The latest complete sharded checkpoint in out_dir, or None."""
    pointer = os.path.join(out_dir, SHARDED, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(out_dir, SHARDED, f.read().strip())


def save_sharded(model, optimizers, state, out_dir, rank):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    # on the weights' device: NCCL reduces no CPU tensors
    finite = torch.tensor(float(all(torch.isfinite(t).all() for t in local)), device=local[0].device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise CheckpointError(f"not writing a checkpoint to {out_dir}/ckpt_dcp: weights hold NaN/inf; "
                              f"the previous checkpoint is kept")
    name = f"iter_{state['iter_num']:08d}"
    step_dir = os.path.join(out_dir, SHARDED, name)
    model_sd, optim_sd = get_state_dict(model, optimizers)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=step_dir)
    if rank == 0:
        save_checkpoint(state, os.path.join(step_dir, "state.pt"))
        pointer = os.path.join(out_dir, SHARDED, "latest")
        with open(pointer + ".tmp", "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer + ".tmp", pointer)
        fsync_dir(os.path.dirname(pointer))
        remove_old_shards(os.path.dirname(pointer), keep=name)
    dist.barrier()


def remove_old_shards(root, keep):
    for entry in os.listdir(root):
        if entry.startswith("iter_") and entry != keep:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def load_sharded_state(out_dir):
    """The plain-typed part (model_args, iter_num, rng, ...) of the latest sharded checkpoint."""
    step_dir = sharded_dir(out_dir)
    if step_dir is None:
        raise CheckpointError(f"{out_dir}/ckpt_dcp/latest not found; no sharded checkpoint to resume")
    path = os.path.join(step_dir, "state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); the sharded checkpoint is incomplete")


def load_sharded(model, optimizers, out_dir):
    """Load the latest sharded weights and optimizer state into an FSDP2 model (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=sharded_dir(out_dir))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def consolidate(out_dir, path=None):
    """Write the latest sharded checkpoint as one ckpt.pt (weights, no optimizer) for sample.py
    and export; runs in one process, no process group needed."""
    import tempfile
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    step_dir = sharded_dir(out_dir)
    if step_dir is None:
        raise CheckpointError(f"{out_dir}/ckpt_dcp/latest not found; nothing to consolidate")
    state = load_sharded_state(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        dcp_to_torch_save(step_dir, os.path.join(tmp, "full.pt"))
        full = torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=True)
    keep = ("model_args", "gpt_config", "iter_num", "best_val_loss", "config", "meta")
    ckpt = {"model": full["model"], **{k: state[k] for k in keep if k in state}}
    path = path or ckpt_path(out_dir)
    save_checkpoint(ckpt, path)
    return path
