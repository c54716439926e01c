"""
Optimizers and their schedule: AdamW (fused) and torch.optim.Muon parameter groups, the
learning-rate schedule, gradient clipping and the non-finite-step guard that skips an
update on the device without a host sync.
"""
import math

import torch

from gpt_trainer.errors import ConfigError


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
        raise ConfigError(f"lr_schedule={schedule!r} is not 'cosine', 'wsd', 'linear' or 'constant'")
    return min_lr + coeff * (learning_rate - min_lr)


def param_groups(model, weight_decay, learning_rate, optimizer="adamw", muon_lr=0.02):
    """Parameter groups by optimizer. Weight decay only on >= 2-D tensors (matmul weights
    and embeddings); with Muon, the 2-D weights inside the blocks go to Muon and
    everything else (embeddings, head, norms, biases) stays with AdamW."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied weights once
    muon = [p for n, p in params.items() if optimizer == "muon" and p.dim() == 2
            and n.startswith("transformer.h.")]
    muon_ids = {id(p) for p in muon}
    rest = [p for p in params.values() if id(p) not in muon_ids]
    adamw = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr": learning_rate},
             {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr": learning_rate}]
    return adamw, ([{"params": muon, "weight_decay": weight_decay, "lr": muon_lr}] if muon else [])

def configure_optimizers(model, weight_decay, learning_rate, betas, device_type,
                         optimizer="adamw", muon_lr=0.02, muon_momentum=0.95):
    """A list of optimizers: [AdamW] or [AdamW, Muon]. Each group remembers its base lr
    ('base_lr') so the schedule can scale every group by the same factor."""
    adamw_groups, muon_groups = param_groups(model, weight_decay, learning_rate, optimizer, muon_lr)
    fused = device_type in ("cuda", "cpu")  # one fused kernel instead of a loop over tensors
    optimizers = [torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=betas, fused=fused)]
    if muon_groups:
        optimizers.append(torch.optim.Muon(muon_groups, lr=muon_lr, momentum=muon_momentum,
                                           adjust_lr_fn="match_rms_adamw"))
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


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
