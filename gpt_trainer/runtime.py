"""
Where and how a run executes, decided once before the training loop: the device and dtype,
autocast, torchrun's process group, DDP/FSDP2 wrapping, torch.compile, the GPU's peak FLOPS
for MFU, and the signal handling that lets every rank stop at the same step.
"""
import ctypes
import datetime
import os
import signal
import socket
import sys
import time
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt_trainer.errors import ConfigError


def resolve_device(device):
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ConfigError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        available = torch.cuda.is_available() if kind == "cuda" else torch.backends.mps.is_available()
        if kind in ("cuda", "mps") and not available:
            raise ConfigError(f"device={device!r} but this machine has no {kind.upper()} device that torch "
                              f"can use; use --device=cpu or --device=auto")
        if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
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
        raise ConfigError(f"dtype={dtype!r} is not 'auto', 'float32', 'bfloat16' or 'float16'")
    return dtype


def keep_freed_memory():
    """glibc hands big freed blocks back to the OS, so each CPU training step page-faults its
    activations in again (~1,200 faults per iteration of the CPU recipe). Keep blocks up to
    glibc's 32 MiB limit in the heap and never trim it: 3x fewer page faults over a run and
    ~15% faster steps (docs/benchmarks.md). A no-op where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_gpu_memory_mb(device_type):
    """The most GPU memory tensors have held so far, MiB (None off CUDA: bench.py reads RSS there)."""
    return torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else None


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


class Runtime(NamedTuple):
    ddp: bool  # under torchrun, with a process group
    rank: int
    local_rank: int
    world_size: int
    device: str  # 'cpu', 'cuda:N', 'mps'
    device_type: str  # 'cpu', 'cuda', 'mps'
    dtype: str  # 'float32', 'bfloat16', 'float16'
    ctx: object  # autocast to dtype, or a no-op for float32


def setup(device="auto", dtype="auto", backend="auto", timeout_s=600, distributed=True):
    """The device, dtype and autocast of a command (train, sample, evaluate), and torchrun's
    process group when launched by it (distributed=False: each process on its own)."""
    device = resolve_device(device)
    if distributed:
        ddp, rank, local_rank, world_size, device = init_distributed(backend, device, timeout_s)
    else:
        ddp, rank, local_rank, world_size = False, 0, 0, 1
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = resolve_dtype(dtype, device_type)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return Runtime(ddp, rank, local_rank, world_size, device, device_type, dtype, autocast_context(device_type, dtype))


def teardown(ddp):
    """End a command's process group, and the process with it. gloo's worker threads release a
    finished collective's tensors on their own; one that does so while Python finalizes cannot
    take the GIL, and the process aborts (exit -6, "terminate called without an active
    exception"; 2 of 25 torchrun eval_only runs, and CI even after the barrier). Everything is
    saved by now: skip finalization (0 of 25 that way)."""
    if not ddp:
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def process_dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # a zombie has died
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False


def report_dead_ranks(rank, where_saved):
    """Under torchrun, a rank that dies makes the others' next collective fail inside the
    transport (gloo: 'Connection reset by peer', a timeout). Such an error ends this rank with one
    line naming the dead rank (found among this host's processes) and where_saved() (which
    checkpoint is intact), instead of a traceback. A collective: every rank calls it once."""
    peers = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if not (issubclass(exc_type, dist.DistError) or issubclass(exc_type, RuntimeError) and "gloo" in str(exc)):
            return previous(exc_type, exc, tb)
        dead = []
        for _ in range(20):  # the dead process may still be exiting when its sockets close
            dead = [r for r, (host, pid) in enumerate(peers) if host == socket.gethostname() and process_dead(pid)]
            if dead:
                break
            time.sleep(0.05)
        alive = [r for r in range(len(peers)) if r not in dead]
        if not dead or rank == alive[0]:  # one line from the first survivor, when it is known
            who = (f"rank {', '.join(map(str, dead))} died" if dead else
                   f"another rank stopped answering ({str(exc).strip().splitlines()[0][:160]})")
            print(f"error: {who}; rank {rank} stops too; {where_saved()}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # skip finalization: gloo's threads may abort it (see train.py's end)
    sys.excepthook = hook


def derive_grad_accum(gradient_accumulation_steps, total_batch_size, batch_size, block_size, world_size):
    """Micro-steps per rank for one optimizer step; the global batch never silently shrinks."""
    if total_batch_size:
        per_micro = batch_size * block_size * world_size
        if total_batch_size % per_micro:
            raise ConfigError(f"total_batch_size={total_batch_size} is not a multiple of batch_size * "
                             f"block_size * world_size = {per_micro}")
        return total_batch_size // per_micro
    if gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps} does not divide "
                         f"by the world size {world_size}; make it a multiple of {world_size}")
    return gradient_accumulation_steps // world_size


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


def full_state_dict(model, fsdp):
    """Unsharded weights (a collective under FSDP2: every rank calls it, rank 0 gets them)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def try_compile(model, x, y, ctx):
    """torch.compile each transformer block and the head's loss, in place. Regional
    compilation: the blocks are the same code, so one compiled graph serves every layer and a
    cold start compiles one block, not the whole model (most of a short GPU run's start-up),
    with the same fusions inside each block. Checked on one forward/backward (RNG untouched,
    gradients dropped); any compile failure falls back to eager with a warning."""
    blocks = list(model.transformer.h)
    for block in blocks:
        block.compile()
    model.head_loss = torch.compile(model.head_loss)
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            with ctx:
                _, loss = model(x, y)
            loss.backward()
    except Exception as e:
        print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              f"running eager", file=sys.stderr)
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set
        del model.head_loss  # back to the class's method
    model.zero_grad(set_to_none=True)
    return model


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


# Dense peak FLOPS by (GPU name fragment, dtype), from the vendors' datasheets (no
# sparsity). fp32 matmuls run as TF32 (train.py enables it), so fp32 uses the TF32 peak.
PEAK_FLOPS = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.7e12}),  # SXM / HBM3
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.7e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    ("4090", {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


def peak_flops(device_name, dtype):
    """Peak FLOPS for a CUDA device name (torch.cuda.get_device_name) and 'bf16'|'fp16'|'fp32';
    None when unknown (CPUs, unlisted GPUs), so MFU is reported as n/a, never guessed."""
    for fragment, table in PEAK_FLOPS:
        if fragment in device_name:
            return table.get(dtype)
    return None
