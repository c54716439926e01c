"""
Checkpoints that survive a kill -9 at any moment and load without unpickling code.

A checkpoint is a dict of tensors and plain Python types, with nanoGPT's keys (model,
optimizer, model_args, iter_num, best_val_loss, config) plus what an exact resume needs
(scaler, rng per rank, data sampler state). Files are written to a temporary file in the
same directory, fsynced, then renamed over the old one, so the old or the new checkpoint
exists at every instant, never a half-written one.
"""
import os
import random

import numpy as np
import torch

from configurator import UserError
from model import GPT, GPTConfig


class CheckpointError(UserError):
    """A checkpoint that cannot be written or used: reported to the user as one line."""


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_finite(state_dict, path):
    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"not writing {path}: weight {name} holds NaN/inf; "
                                  f"the previous checkpoint is kept")


def remove_stale_temps(path):
    """Temp files left by a writer that was killed mid-save; never mistaken for checkpoints
    (they are hidden and not named ckpt.pt), but they hold disk space."""
    directory, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(directory):
        if entry.startswith(f".{name}.tmp"):
            try:
                os.remove(os.path.join(directory, entry))
            except FileNotFoundError:
                pass


def save_checkpoint(state, path):
    """Atomically write `state` to `path`. A failed write (full disk, permissions) leaves the
    previous file untouched and raises CheckpointError."""
    assert_finite(state.get("model", {}), path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
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
        raise CheckpointError(f"could not write {path} ({e}); the previous checkpoint is kept")


def strip_prefixes(state_dict):
    # torch.compile wraps the model as _orig_mod, DDP as module; old nanoGPT files kept them
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True: a file someone handed you cannot run code."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} not found; train first or point --out_dir/--ckpt at a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
    """The GPT a checkpoint describes, with its weights loaded (dropout may be overridden)."""
    args = dict(ckpt["model_args"])
    if dropout is not None:
        args["dropout"] = dropout
    model = GPT(model_config(args, path))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{path}: weights do not fit model_args ({first})")
    return model


def check_model_args(saved, requested, path):
    """Architecture settings given for this run must agree with the checkpoint's."""
    for key, value in requested.items():
        if key in saved and key != "dropout" and saved[key] != value:
            raise CheckpointError(f"{path}: model_args.{key}={saved[key]!r} but this run sets "
                                  f"{key}={value!r}; drop the override or use a new out_dir")


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
# FSDP2: sharded checkpoints through torch.distributed.checkpoint (DCP). Every rank writes
# its shards to out_dir/ckpt_dcp/iter_N/ (plus state.pt with the plain-typed resume state
# from rank 0); only then is ckpt_dcp/latest atomically pointed at it, so a kill mid-write
# leaves the previous iter_N in use.

def sharded_dir(out_dir):
    """The latest complete sharded checkpoint in out_dir, or None."""
    pointer = os.path.join(out_dir, "ckpt_dcp", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(out_dir, "ckpt_dcp", f.read().strip())


def save_sharded(model, optimizers, state, out_dir, rank):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    finite = torch.tensor(float(all(torch.isfinite(t).all() for t in local)))
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise CheckpointError(f"not writing a checkpoint to {out_dir}/ckpt_dcp: weights hold NaN/inf; "
                              f"the previous checkpoint is kept")
    name = f"iter_{state['iter_num']:08d}"
    step_dir = os.path.join(out_dir, "ckpt_dcp", name)
    model_sd, optim_sd = get_state_dict(model, optimizers)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=step_dir)
    if rank == 0:
        save_checkpoint(state, os.path.join(step_dir, "state.pt"))
        pointer = os.path.join(out_dir, "ckpt_dcp", "latest")
        with open(pointer + ".tmp", "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer + ".tmp", pointer)
        fsync_dir(os.path.dirname(pointer))
        remove_old_shards(os.path.dirname(pointer), keep=name)
    dist.barrier()


def remove_old_shards(root, keep):
    import shutil
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
    keep = ("model_args", "iter_num", "best_val_loss", "config", "meta")
    ckpt = {"model": full["model"], **{k: state[k] for k in keep if k in state}}
    path = path or os.path.join(out_dir, "ckpt.pt")
    save_checkpoint(ckpt, path)
    return path


if __name__ == "__main__":
    import sys

    from configurator import install_error_hook
    install_error_hook()
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "consolidate":
        raise UserError("usage: python checkpoint.py consolidate OUT_DIR [CKPT_PATH]  "
                        "(FSDP sharded checkpoint -> one ckpt.pt for sample.py and hf.py)")
    print(f"wrote {consolidate(*sys.argv[2:])}")
