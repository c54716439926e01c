"""
What this machine allows: the speed a run could reach if it did nothing but its unavoidable
work at the machine's measured rate. bench.py prints each speed beside its floor and the
fraction of the floor reached, a number that holds across machines better than a ratio to
another program.

- Decoding one token at batch 1 reads every weight the step multiplies by and the KV cache it
  attends to: its floor is those bytes over the measured copy bandwidth.
- A training iteration does 6N + attention FLOPs per token (the MFU formula,
  GPT.flops_per_token): its floor is those FLOPs over the measured large-matmul rate.
"""
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def best_seconds(fn, repeats, device="cpu"):
    """The fastest of `repeats` timed calls after one warm-up: on a shared machine the
    fastest run is the one least disturbed by other processes."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(nbytes=256 << 20, repeats=5, device="cpu"):
    """Bytes per second a large tensor copy moves (read plus written, as STREAM's copy counts
    them), with torch's threads; far larger than the caches, so it is the memory's rate."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_seconds(lambda: dst.copy_(src), repeats, device)


def matmul_rates(dtype="float32", n=2048, repeats=3, device="cpu"):
    """{library: FLOP/s} of an (n, n) x (n, n) matmul in `dtype` through aten's default path
    (MKL's sgemm for fp32 on x86) and, on a CPU where torch has it, oneDNN's; the floor uses
    the best."""
    from gpt_trainer.cpu_kernels import ONEDNN_LINEAR
    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])
    rates = {"aten": 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b), repeats, device)}
    if ONEDNN_LINEAR is not None and torch.device(device).type == "cpu":
        rates["onednn"] = 2 * n ** 3 / best_seconds(lambda: ONEDNN_LINEAR(a, b, None, "none", [], ""), repeats)
    return rates


# -----------------------------------------------------------------------------
# decoding: bytes a step reads

def weight_bytes(model):
    """Bytes of the weights one decoding step reads: every parameter, except that of the
    embedding tables only a row is read (the token's, the position's), unless the token
    embedding is also the output head (tied), which reads all of it."""
    c = model.config
    total, tied = 0, c.tie_embeddings
    for name, p in model.named_parameters():  # a tied weight is listed once
        rows_only = name.endswith("wpe.weight") or (name.endswith("wte.weight") and not tied)
        total += (p[0].numel() if rows_only else p.numel()) * p.element_size()
    return total


def kv_bytes(config, context, itemsize=4):
    """Bytes of keys and values one new token attends to over `context` cached positions
    (itself included), all layers."""
    return 2 * config.n_layer * config.kv_heads * config.head_size * context * itemsize


def forward_flops(n_params, config, T, context):
    """Inference FLOPs of a forward over T new tokens that attend to `context` positions:
    2 per weight per token and the attention scores and values (2 matmuls)."""
    return 2 * n_params * T + 4 * config.n_layer * config.n_head * config.head_size * T * context


def generation_steps(block_size, prompt, new, use_cache, window):
    """[(new tokens fed, positions attended)] per step of GPT.generate_stream, which feeds
    one token per step from the cache and recomputes a window where it must."""
    steps, cached = [], 0  # cached: tokens in the KV cache before this step
    for L in range(prompt, prompt + new):  # L tokens so far
        if not use_cache:
            T = L if window == "sliding" else min(L, block_size)
            steps.append((T, T))
        elif cached and (cached < block_size or window == "sliding"):
            steps.append((1, min(cached + 1, block_size)))
            cached += 1
        else:
            keep = block_size if (window != "chunked" or L <= block_size) else max(1, block_size // 2)
            T = min(L, keep)
            steps.append((T, T))
            cached = T
    return steps


def generation_floor(model, prompt, new, use_cache, window, bandwidth, flops_rate, batch=1):
    """Seconds the generation could take at best: per step, the larger of its bytes over the
    copy bandwidth and its FLOPs over the matmul rate (a cached step is a matter of bytes, a
    recomputed window of FLOPs)."""
    c, w, n = model.config, weight_bytes(model), model.get_num_params()
    itemsize = next(model.parameters()).element_size()
    total = 0.0
    for T, context in generation_steps(c.block_size, prompt, new, use_cache, window):
        bytes_read = w + (batch * kv_bytes(c, context, itemsize) if use_cache else 0)
        total += max(bytes_read / bandwidth, batch * forward_flops(n, c, T, context) / flops_rate)
    return total


def fraction(measured_per_s, floor_per_s):
    """How much of the floor a speed reaches (1 = the machine's limit)."""
    return measured_per_s / floor_per_s if measured_per_s and floor_per_s else None
