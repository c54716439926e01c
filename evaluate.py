"""
Evaluation: the mean loss over a fixed set of windows of each split, shared out across
ranks so that the number does not depend on the world size.
"""
import torch
import torch.distributed as dist

from dataloader import get_batch

EVAL_SEED = 0  # eval windows do not depend on the run's seed, so runs with different seeds compare


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
