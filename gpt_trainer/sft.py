"""
Supervised fine-tuning on a chat data dir (data/chat/prepare.py): the loss only on the
assistant's tokens.

A chat data dir has, beside train.bin and val.bin, train_mask.bin and val_mask.bin: one uint8
per token, 1 where the token is the assistant's. Batches are the same windows BatchLoader
draws (so resume and the data order are as exact as in pretraining); a target whose mask is 0
becomes -1, which the loss ignores.

The loss of a step is (sum of the target tokens' losses) / (the number of target tokens in
the whole step, over every micro-batch of every rank). Each rank computes that count itself
from the mask files (the windows are a pure function of (seed, step, micro-batch)), so no
collective is needed, and a micro-batch with few targets weighs in by its tokens, not as a
whole micro-batch: the step's gradient is the same whatever the world size or accumulation.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from gpt_trainer.dataloader import BatchLoader, TokenFile, read_windows
from gpt_trainer.errors import DataError


def open_masks(data_dir, meta, splits):
    """{'train': TokenFile, 'val': ...} of a chat data dir's masks, or None for plain text data."""
    if not (meta.get("chat") or {}).get("mask_files"):
        return None
    masks = {}
    for split, data in splits.items():
        path = os.path.join(data_dir, f"{split}_mask.bin")
        if not os.path.exists(path):
            raise DataError(f"{path} not found; the chat data dir is incomplete, re-run data/chat/prepare.py")
        masks[split] = TokenFile(path, np.uint8)
        if len(masks[split]) != len(data):
            raise DataError(f"{path}: {len(masks[split])} entries for {len(data)} tokens in {split}.bin; "
                            f"re-run data/chat/prepare.py")
    return masks


def masked_targets(y, mask_rows):
    """y with -1 where the target token is not the assistant's (mask_rows: the windows' masks)."""
    return y.masked_fill(mask_rows[:, 1:] == 0, -1)


def read_masks(mask, starts, block_size):
    rows = np.empty((len(starts), block_size + 1), dtype=np.uint8)
    for row, start in zip(rows, starts):
        row[:] = mask.read(int(start), block_size + 1)
    return torch.from_numpy(rows)


class ChatBatchLoader(BatchLoader):
    """BatchLoader whose y is -1 where the target is not an assistant token; loss_scale(step)
    turns a micro-batch's summed loss into its share of the step's mean (see the module doc)."""

    def __init__(self, mask, data, *args, **kwargs):
        super().__init__(data, *args, **kwargs)
        self.mask, self._scale = mask, None

    def _host_batch(self, step, index):
        starts = self._starts(step, index)
        x, y = read_windows(self.data, starts, self.block_size)
        y = masked_targets(y, read_masks(self.mask, starts, self.block_size))
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def targets_in_step(self, step):
        """Target tokens of every micro-batch of the step, all ranks together."""
        return sum(int(read_masks(self.mask, self._starts(step, i), self.block_size)[:, 1:].sum())
                   for i in range(self.micro_steps_per_step))

    def loss_scale(self, step):
        if self._scale is None or self._scale[0] != step:
            self._scale = (step, self.micro_steps_per_step / max(1, self.targets_in_step(step)))
        return self._scale[1]


def loss_sum(model, x, y):
    """Summed cross-entropy of the targets that are not -1 (0 when there are none)."""
    logits, _ = model(x, all_logits=True)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")


def sft_loss(model, x, y, scale):
    """The micro-batch's loss as train.py's loop expects it (it divides by the micro-batches of
    the step): the summed target loss x micro-batches per step / the step's target tokens."""
    return loss_sum(model, x, y) * scale
