"""
Train a GPT. One process:

    python train.py config/train_shakespeare_char.py --batch_size=32

DDP on one node of 8 GPUs (or CPU processes, with gloo):

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Every setting below can be set by a config file or a --key=value override; `--help`
lists them. Stop it any time (Ctrl-C, SIGTERM, preemption, kill -9): `--init_from=resume`
(or 'auto') continues exactly where the last checkpoint left off.
"""
import ctypes
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# settings: defaults train GPT-2 124M on OpenWebText on 8 GPUs, as nanoGPT
# I/O
out_dir = "out"  # checkpoints, metrics.jsonl and logs go here
eval_interval = 2000  # iterations between evaluations of train and val loss
log_interval = 1  # iterations between log lines (each costs a host sync)
eval_iters = 200  # batches per split in each evaluation (a fixed set, the same every time)
eval_only = False  # evaluate once and exit
ckpt_interval = 0  # iterations between saves of ckpt.pt (the resume point); 0 = eval_interval
always_save_checkpoint = True  # False: also keep best.pt, the weights with the best val loss
init_from = "scratch"  # 'scratch', 'resume', 'auto' (resume if out_dir has ckpt.pt), 'gpt2*' or an HF dir
max_bad_steps = 5  # stop after this many non-finite losses/gradients in a row
# wandb logging
wandb_log = False  # log to Weights & Biases as well as out_dir/metrics.jsonl
wandb_project = "owt"  # wandb project name
wandb_run_name = "gpt2"  # wandb run name
# data
dataset = "openwebtext"  # a prepared dataset under data/
data_dir = ""  # explicit path to a dataset directory; overrides dataset when set
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, summed over all ranks
total_batch_size = 0  # tokens per optimizer step; when set, gradient_accumulation_steps is derived
batch_size = 12  # sequences per micro-step per rank
block_size = 1024  # context length in tokens
sampling = "random"  # 'random' windows (nanoGPT) or 'epoch' (each window once per epoch)
# model (see model.GPTConfig)
n_layer = 12  # transformer blocks
n_head = 12  # attention heads
n_embd = 768  # embedding width
dropout = 0.0  # 0 for pretraining, try 0.1+ for finetuning
bias = True  # bias in Linear and LayerNorm layers (GPT-2 has them)
vocab_size = 0  # 0 = from the dataset's meta.json, else 50304 (GPT-2, padded)
n_kv_head = 0  # key/value heads for grouped-query attention; 0 = n_head
pos_emb = "learned"  # 'learned' (GPT-2) or 'rope'
rope_theta = 10000.0  # RoPE base frequency
norm = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm'
mlp = "gelu"  # 'gelu' (GPT-2), 'relu2' or 'swiglu'
multiple_of = 64  # SwiGLU hidden size rounds up to a multiple of this
qk_norm = False  # normalise queries and keys before attention
tie_embeddings = True  # share the token embedding with the output head (GPT-2)
logit_softcap = 0.0  # soft-cap logits at this value; 0 = off
# optimizer
optimizer = "adamw"  # 'adamw', or 'muon' (Muon for hidden 2-D weights, AdamW for the rest)
learning_rate = 6e-4  # peak learning rate of AdamW
max_iters = 600000  # optimizer steps in the whole run
weight_decay = 1e-1  # decoupled weight decay on 2-D weights and embeddings
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the global gradient norm to this; 0 = no clipping
muon_lr = 0.02  # peak learning rate of Muon (optimizer='muon')
muon_momentum = 0.95  # Muon momentum
# learning rate schedule
decay_lr = True  # False = constant learning_rate, no warmup
lr_schedule = "cosine"  # 'cosine', 'wsd' (warmup-stable-decay), 'linear' or 'constant'
warmup_iters = 2000  # linear warmup steps
lr_decay_iters = 600000  # step at which the decay reaches min_lr (usually max_iters)
min_lr = 6e-5  # floor of the decay, ~learning_rate / 10
decay_frac = 0.2  # wsd: fraction of the post-warmup steps spent decaying
# system
backend = "auto"  # DDP backend: 'nccl' on CUDA, 'gloo' on CPU
ddp_timeout = 600  # seconds a collective waits for a missing or dead rank before failing
fsdp = False  # shard weights, gradients and optimizer state with FSDP2 instead of DDP (torchrun)
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bf16 on CUDA if supported, else fp16; fp32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = "auto"  # torch.compile the model; 'auto' = on CUDA only
seed = 1337  # seeds the data order and every RNG
# -----------------------------------------------------------------------------
SETTINGS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
MODEL_KEYS = ["n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout", "n_kv_head",
              "pos_emb", "rope_theta", "norm", "mlp", "multiple_of", "qk_norm", "tie_embeddings", "logit_softcap"]
EVAL_SEED = 0  # eval windows do not depend on `seed`, so runs with different seeds compare


class TrainingError(Exception):
    """The run cannot go on for a reason the user can fix: reported as one line."""


def get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters, schedule="cosine", decay_frac=0.2):
    """Learning rate at step `it`: linear warmup that is non-zero at step 0 and reaches
    learning_rate at warmup_iters, then the schedule down to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == "constant":
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)  # 0 -> 1
    if schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        coeff = 1.0 - progress
    elif schedule == "wsd":
        coeff = min(1.0, (1.0 - progress) / decay_frac) if decay_frac > 0 else 1.0
    else:
        raise ValueError(f"lr_schedule={schedule!r} is not 'cosine', 'wsd', 'linear' or 'constant'")
    return min_lr + coeff * (learning_rate - min_lr)


def resolve_device(device):
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype, device_type):
    """fp32/bf16/fp16 as a name; 'auto' picks bf16 on CUDA when supported, else fp16 (with a
    GradScaler), and fp32 elsewhere."""
    if dtype == "auto":
        if device_type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} is not 'auto', 'float32', 'bfloat16' or 'float16'")
    return dtype


def keep_freed_memory():
    """glibc hands big freed blocks back to the OS, so each CPU training step page-faults its
    activations in again (~1,200 faults per iteration of the CPU recipe). Keep blocks up to
    glibc's 32 MiB limit in the heap and never trim it: 3x fewer page faults over a run and
    ~15% faster steps (README, Benchmarks). A no-op where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def autocast_context(device_type, dtype):
    if dtype == "float32":
        return nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def init_distributed(backend, device, timeout_s=600):
    """(ddp, rank, local_rank, world_size, device) from torchrun's environment."""
    if "RANK" not in os.environ:
        return False, 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True, rank, local_rank, world_size, device


def derive_grad_accum(gradient_accumulation_steps, total_batch_size, batch_size, block_size, world_size):
    """Micro-steps per rank for one optimizer step; the global batch never silently shrinks."""
    if total_batch_size:
        per_micro = batch_size * block_size * world_size
        if total_batch_size % per_micro:
            raise ValueError(f"total_batch_size={total_batch_size} is not a multiple of batch_size * "
                             f"block_size * world_size = {per_micro}")
        return total_batch_size // per_micro
    if gradient_accumulation_steps % world_size:
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} does not divide "
                         f"by the world size {world_size}; make it a multiple of {world_size}")
    return gradient_accumulation_steps // world_size


@torch.no_grad()
def estimate_loss(model, splits, block_size, batch_size, eval_iters, ctx, device, rank=0, world_size=1):
    """Mean loss over the same eval_iters batches of each split every time, shared out across
    ranks and summed, so the number does not depend on the world size."""
    out = {}
    model.eval()
    for split, data in splits.items():
        total = torch.zeros((), device=device)
        padded = -(-eval_iters // world_size) * world_size  # FSDP: every rank runs every forward
        for k in range(rank, padded, world_size):
            x, y = get_batch(data, block_size, batch_size, EVAL_SEED, k % eval_iters, 0)
            with ctx:
                _, loss = model(x.to(device), y.to(device))
            total += loss.float() * (k < eval_iters)
        if world_size > 1:
            dist.all_reduce(total)
        out[split] = total.item() / eval_iters
    model.train()
    return out


def shard_model(model):
    """FSDP2: each block is its own unit, so only one block's full weights exist at a time."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def set_grad_sync(model, sync):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last
    micro-step; set before the forward pass, which is when DDP reads it."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def step_optimizers(optimizers, scaler, finite):
    """Step each optimizer unless `finite` (a 0-d float tensor, 1.0 or 0.0, the same on every
    rank) is 0, without a host sync where the optimizer can skip on the device: fused Adam/AdamW
    leave parameters and state untouched when given found_inf=1. Others (Muon) read the flag on
    the host. With fp16 the GradScaler skips inf/NaN gradients itself, in the same way."""
    host_finite = None
    for opt in optimizers:
        if scaler.is_enabled():
            scaler.step(opt)
        elif all(group.get("fused") for group in opt.param_groups):
            opt.found_inf = 1.0 - finite
            opt.step()
            del opt.found_inf
        else:
            if host_finite is None:
                host_finite = finite.item() > 0
            if host_finite:
                opt.step()


def tally_skips(finite_flags, first_iter, bad_steps):
    """The non-finite guard's host side, run only at steps that read the device anyway (log and
    checkpoint steps): finite_flags are the flags of iterations first_iter, first_iter + 1, ...
    Returns [(iter, bad steps in a row)] for each skipped update, and the count after the last."""
    skipped = []
    for i, ok in enumerate(torch.stack(finite_flags).tolist() if finite_flags else []):
        bad_steps = 0 if ok else bad_steps + 1
        if not ok:
            skipped.append((first_iter + i, bad_steps))
    return skipped, bad_steps


def clip_gradients(model, grad_clip):
    """Global gradient norm (a plain tensor, also under FSDP2), clipped to grad_clip if set."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model, fsdp):
    """Unsharded weights (a collective under FSDP2: every rank calls it, rank 0 gets them)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def try_compile(model, x, y, ctx):
    """torch.compile the model, checked on one forward/backward (RNG untouched, gradients
    dropped); any compile failure falls back to eager with a warning."""
    compiled = torch.compile(model)
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            with ctx:
                _, loss = compiled(x, y)
            loss.backward()
    except Exception as e:
        print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              f"running eager", file=sys.stderr)
        compiled = model
    model.zero_grad(set_to_none=True)
    return compiled


class StopSignal:
    """SIGTERM/SIGINT ask the loop to stop after the current step; a second SIGINT aborts."""

    def __init__(self, ddp=False):
        self.requested, self.ddp = False, ddp
        # any_rank asks every step, so over gloo on CPU tensors: it never waits for a GPU
        self.group = dist.new_group(backend="gloo") if ddp and dist.get_backend() != "gloo" else None
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            print("\nsecond Ctrl-C: aborting without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again aborts)",
              file=sys.stderr, flush=True)

    def any_rank(self):
        """Whether any rank saw a signal, so that every rank stops at the same step."""
        if not self.ddp:
            return self.requested
        flag = torch.tensor(float(self.requested))
        dist.all_reduce(flag, group=self.group)
        return flag.item() > 0


def append_metrics(path, record):
    # NaN/inf are not JSON: a skipped step's loss is written as null
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, oldest first; [] before the first one."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path, iter_num):
    """Drop records at or after iter_num, left by a run that died after its last checkpoint,
    so the resumed run's file reads as one history."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        # a line without its newline is torn (a kill or full disk mid-append): drop it
        kept = [line for line in f if line.strip() and line.endswith("\n")
                and json.loads(line).get("iter", 0) < iter_num]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


from checkpoint import (CheckpointError, build_model, capture_rng, check_model_args,  # noqa: E402
                        load_checkpoint, load_sharded, load_sharded_state, model_config, restore_rng,
                        save_checkpoint, save_sharded, sharded_dir)
from configurator import ConfigError, configure, install_error_hook  # noqa: E402
from dataloader import BatchLoader, DataError, get_batch, load_meta, open_dataset  # noqa: E402
from model import GPT, peak_flops  # noqa: E402

if __name__ == "__main__":
    install_error_hook(CheckpointError, DataError, TrainingError, ValueError)
    defaults = {k: globals()[k] for k in SETTINGS}
    globals().update(configure(defaults, sys.argv[1:], __file__))
    config = {k: globals()[k] for k in SETTINGS}  # what this run used, saved in checkpoints
    explicit = {k for k in SETTINGS if config[k] != defaults[k]}

    # -------------------------------------------------------------------------
    # device, dtype, DDP: decided once, the loop below has no device branches
    device = resolve_device(device)
    ddp, rank, local_rank, world_size, device = init_distributed(backend, device, ddp_timeout)
    master_process = rank == 0
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = resolve_dtype(dtype, device_type)
    ctx = autocast_context(device_type, dtype)
    if device_type == "cpu":
        keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if fsdp and not ddp:
        raise ValueError("fsdp=True needs torchrun (e.g. torchrun --nproc_per_node=2 train.py ...)")
    if fsdp and optimizer == "muon":
        raise ValueError("optimizer='muon' needs whole weight matrices; use it without fsdp")
    grad_accum = derive_grad_accum(gradient_accumulation_steps, total_batch_size, batch_size,
                                   block_size, world_size)
    tokens_per_iter = grad_accum * world_size * batch_size * block_size
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        print(f"device {device}, dtype {dtype}, world size {world_size}, {grad_accum} micro-steps "
              f"per rank, {tokens_per_iter:,} tokens per iteration")
    torch.manual_seed(seed)  # the same initial weights on every rank (FSDP shards them as they are)

    # -------------------------------------------------------------------------
    # model: from scratch, a checkpoint, or GPT-2 weights
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if init_from == "auto":
        found = sharded_dir(out_dir) if fsdp else os.path.exists(ckpt_path)
        init_from = "resume" if found else "scratch"
        if master_process:
            print(f"init_from='auto': {'resuming from ' + ckpt_path if init_from == 'resume' else 'no checkpoint, starting from scratch'}")
    data_dir = data_dir or os.path.join("data", dataset)
    ckpt, iter_num, best_val_loss, bad_steps = None, 0, 1e9, 0
    if init_from == "scratch":
        meta_vocab = load_meta(data_dir).get("vocab_size") if os.path.isdir(data_dir) else None
        model_args = {k: config[k] for k in MODEL_KEYS}
        model_args["vocab_size"] = vocab_size or meta_vocab or 50304
        model = GPT(model_config(model_args, "settings"))
    elif init_from == "resume":
        ckpt = load_sharded_state(out_dir) if fsdp else load_checkpoint(ckpt_path)
        check_model_args(ckpt["model_args"], {k: config[k] for k in explicit & set(MODEL_KEYS)}, ckpt_path)
        if fsdp:  # weights are loaded after sharding, below
            model = GPT(model_config({**ckpt["model_args"], "dropout": dropout}, ckpt_path))
        else:
            model = build_model(ckpt, ckpt_path, dropout=dropout if "dropout" in explicit else None)
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        bad_steps = ckpt.get("bad_steps", 0)
    else:
        from hf import check_hf_overrides, gpt_from_hf
        check_hf_overrides({k: config[k] for k in explicit & set(MODEL_KEYS) - {"block_size"}})
        model = gpt_from_hf(init_from, dropout=dropout)
        if block_size < model.config.block_size:
            model.crop_block_size(block_size)
    if block_size != model.config.block_size:
        raise ValueError(f"block_size={block_size} but the model has block_size {model.config.block_size}")
    model_args = asdict(model.config)
    model.to(device)
    if master_process:
        print(f"{model.get_num_params() / 1e6:.2f}M parameters")
    torch.manual_seed(seed + rank)  # dropout differs per rank; the data order does not
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    if fsdp:
        model = shard_model(model)  # before the optimizer, which must see the sharded parameters

    # -------------------------------------------------------------------------
    # data: validated up front; batches depend only on (seed, step, micro-batch)
    splits, meta = open_dataset(data_dir, block_size, model.config.vocab_size)
    if meta.get("encoding") == "bpe":  # checkpoints carry their tokenizer, wherever the data goes
        with open(os.path.join(data_dir, meta.get("tokenizer_file", "tokenizer.json"))) as f:
            meta["tokenizer_json"] = f.read()
    loader = BatchLoader(splits["train"], block_size, batch_size, seed, grad_accum * world_size,
                         sampling=sampling, device=device, rank_first_index=rank * grad_accum,
                         rank_num_micro=grad_accum)

    # -------------------------------------------------------------------------
    # optimizer and GradScaler (only fp16 needs loss scaling)
    optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                            optimizer, muon_lr, muon_momentum)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if ckpt is not None:
        # this run's lr, betas and weight_decay win over the checkpoint's (e.g. a lower lr to recover)
        hyper = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]
        if fsdp:
            load_sharded(model, optimizers, out_dir)
        else:
            if "optimizer" not in ckpt:
                raise CheckpointError(f"{ckpt_path} has no optimizer state (written by best.pt or "
                                      f"consolidate), so it cannot resume; use it with sample.py")
            saved = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
            if len(saved) != len(optimizers):
                raise CheckpointError(f"{ckpt_path}: optimizer state holds {len(saved)} optimizer(s), this run "
                                      f"uses {len(optimizers)}; keep optimizer={ckpt['config'].get('optimizer')!r}")
            for opt, state in zip(optimizers, saved):
                opt.load_state_dict(state)
        for opt, groups in zip(optimizers, hyper):
            for group, h in zip(opt.param_groups, groups):
                group.update(h)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt.get("rng") or []
        if len(rng) == world_size:
            restore_rng(rng[rank])
        elif master_process:
            print(f"note: checkpoint has RNG states for {len(rng)} rank(s), this run has {world_size}; "
                  f"dropout masks will differ from an uninterrupted run", file=sys.stderr)
        if "sampler" in ckpt:
            loader.load_state_dict(ckpt["sampler"])
        ckpt = None  # free the memory

    # -------------------------------------------------------------------------
    # compile and wrap for DDP
    raw_model = model
    if compile == "auto" and device_type == "cuda" or compile is True:
        x, y = loader.get(iter_num, rank * grad_accum)
        model = try_compile(model, x, y, ctx)
    eval_model = model
    if ddp and not fsdp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    peak = peak_flops(torch.cuda.get_device_name(device) if device_type == "cuda" else "",
                      {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype])

    # -------------------------------------------------------------------------
    # logging: metrics.jsonl in out_dir always, wandb when asked
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master_process:
        truncate_metrics(metrics_path, iter_num)
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def save(path, with_optimizer=True):
        """Gather every rank's RNG (a collective: all ranks call this), then rank 0 writes."""
        rng = [None] * world_size
        if ddp:
            dist.all_gather_object(rng, capture_rng())
        else:
            rng = [capture_rng()]
        state = dict(model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss,
                     config=config, meta=meta, bad_steps=bad_steps)
        if with_optimizer:
            state.update(scaler=scaler.state_dict(), rng=rng, sampler=loader.state_dict(iter_num),
                         world_size=world_size)
        if fsdp and with_optimizer:
            return save_sharded(raw_model, optimizers, state, out_dir, rank)
        state["model"] = full_state_dict(raw_model, fsdp)
        ok = torch.ones((), device=device)
        if master_process:
            if with_optimizer:
                state["optimizer"] = [opt.state_dict() for opt in optimizers]
            try:
                save_checkpoint(state, path)
            except CheckpointError as e:
                if not ddp:
                    raise  # one error line; under DDP the other ranks must hear of it first
                print(f"error: {e}", file=sys.stderr)
                ok.zero_()
        if ddp:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() == 0:
            raise CheckpointError(f"saving {path} failed (see above); the previous checkpoint is kept")

    # -------------------------------------------------------------------------
    # training loop
    stop = StopSignal(ddp)
    resume_path = os.path.join(out_dir, "ckpt_dcp") if fsdp else ckpt_path
    start_iter = iter_num
    ckpt_every = ckpt_interval or eval_interval

    def checkpoint_due(it):
        return it > start_iter and (it % ckpt_every == 0 or it >= max_iters)

    finite_flags = []  # one per step since the host last counted skipped updates
    t0 = time.perf_counter()
    while True:
        # evaluate, keep the best weights
        lr_scale = get_lr(iter_num, 1.0, min_lr / learning_rate if learning_rate else 0.0, warmup_iters,
                          lr_decay_iters, lr_schedule, decay_frac) if decay_lr else 1.0  # lr 0 is allowed
        if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
            losses = estimate_loss(eval_model, splits, block_size, batch_size, eval_iters, ctx, device,
                                   rank, world_size)
            if master_process:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                append_metrics(metrics_path, {"iter": iter_num, "train_loss": losses["train"],
                                              "val_loss": losses["val"]})
                if wandb_log:
                    wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"]})
            if eval_only:
                break
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                if not always_save_checkpoint and iter_num > start_iter:
                    save(os.path.join(out_dir, "best.pt"), with_optimizer=False)
            t0 = time.perf_counter()

        # save the resume point
        # (not while updates are being skipped: the last good checkpoint stays the resume point)
        if checkpoint_due(iter_num) and bad_steps == 0:
            save(ckpt_path)
            if master_process:
                print(f"saved {resume_path} at iter {iter_num}")
        if iter_num >= max_iters:
            break

        # forward/backward over the micro-steps; gradients sync only on the last one
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            set_grad_sync(model, micro_step == grad_accum - 1)
            x, y = loader.get(iter_num, rank * grad_accum + micro_step)
            with ctx:
                _, loss = model(x, y)
            loss_sum += loss.detach().float()
            scaler.scale(loss / grad_accum).backward()

        # clip the unscaled gradients; skip the update if the loss or gradients are not finite,
        # decided on the device: the host learns of it at the next log or checkpoint step
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = clip_gradients(raw_model, grad_clip)
        # with fp16, inf gradients are the GradScaler's business: it skips the step and rescales
        finite = (torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) | scaler.is_enabled())).float()
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        step_optimizers(optimizers, scaler, finite)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        finite_flags.append(finite)

        # count skipped updates where the host waits for the device anyway; stop after too many
        stopping = stop.any_rank()
        if iter_num % log_interval == 0 or stopping or checkpoint_due(iter_num + 1):
            skipped, bad_steps = tally_skips(finite_flags, iter_num + 1 - len(finite_flags), bad_steps)
            finite_flags = []
            for it, run in skipped:
                if master_process:
                    print(f"iter {it}: non-finite loss or gradient, update skipped "
                          f"({run}/{max_bad_steps} in a row)", file=sys.stderr)
                    append_metrics(metrics_path, {"iter": it, "skipped_step": True, "bad_steps": run})
                if run >= max_bad_steps:
                    raise TrainingError(f"{run} non-finite steps in a row at iter {it}; lower "
                                        f"learning_rate or check the data; {ckpt_path} holds the last good state")

        # log
        if iter_num % log_interval == 0:
            if ddp:
                dist.all_reduce(loss_sum)  # gloo has no AVG
            dt = time.perf_counter() - t0
            lossf = loss_sum.item() / grad_accum / world_size
            mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak * world_size if peak else None)
            if master_process:
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr_scale * learning_rate:.2e}, time "
                      f"{dt * 1000:.1f}ms, {tokens_per_iter / dt:,.0f} tok/s, "
                      f"mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}")
                record = {"iter": iter_num, "loss": lossf, "lr": lr_scale * learning_rate, "ms": dt * 1000,
                          "tokens_per_s": tokens_per_iter / dt, "mfu": mfu, "bad_steps": bad_steps,
                          "data_wait_ms": loader.wait_time * 1000}
                append_metrics(metrics_path, record)
                if wandb_log:
                    wandb.log({"iter": iter_num, "train/loss": lossf, "lr": record["lr"], "mfu": mfu})
        t0 = time.perf_counter()
        iter_num += 1

        # a signal on any rank: save at this step on every rank, exit 0
        if stopping:
            save(ckpt_path)
            if master_process:
                print(f"saved {resume_path} at iter {iter_num}; resume with --init_from=resume")
            break

    loader.close()
    if wandb_log and master_process:
        wandb.finish()
    if ddp:
        # gloo's worker threads release a finished collective's tensors on their own; one that
        # does so while Python finalizes cannot take the GIL, and the process aborts (exit -6,
        # "terminate called without an active exception"; 2 of 25 torchrun eval_only runs, and
        # CI even after the barrier). All is saved by now: skip finalization (0 of 25 that way).
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
