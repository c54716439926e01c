"""
Decoding on the CPU as one compiled call per token with the weights frozen into it
(sample.py --compile=True). At batch 1 a decoding step reads every weight once to multiply it
by one row; aten's and oneDNN's matrix-vector calls stream the weights at about half the
memory's rate on a 2-core AMD EPYC, while inductor's own kernel for a weight it prepacked at
compile time (freezing, max-autotune) reads them at nearly the full rate (docs/cpu_speed.md).
Freezing folds the weights into the compiled step as constants and needs fixed shapes, so the
step runs over a StaticKVCache of block_size, and a change to any weight compiles a new step.
"""
import itertools
import weakref

import torch
import torch.nn as nn

from gpt_trainer.generate import decode, step_params
from gpt_trainer.kv_cache import StaticKVCache

SERIALS = itertools.count()


class DecodeStep(nn.Module):
    """decode() as a module over the model: torch.compile lifts the weights a module reads as
    its parameters, which freezing then turns into constants (weights passed in a dict would
    stay inputs of the compiled step and be read through aten's calls)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # dynamo keeps compiled code per function, not per module, and its guards check shapes,
        # not which weights were frozen in: a number no other step has (dynamo specializes on
        # it) keeps a new step, or another model's, from running this one's constants
        self.serial = next(SERIALS)

    def forward(self, token, cache, serial):
        if serial != self.serial:  # a branch on it: dynamo guards a value only where it is used
            raise ValueError(f"step {self.serial} called as step {serial}")
        return decode(self.model, token, cache, step_params(self.model, "aten"))


class FrozenDecode:
    """A decode_fn for generate_stream: decode(model, token, cache, params) as a compiled,
    frozen DecodeStep per (model, batch size, autocast dtype, weights), compiled at its first
    step. A generation's KVCache (block_size long, from the prefill) is read as a
    StaticKVCache; past block_size (a RoPE ring) the step is the eager one."""

    def __init__(self):
        import torch._inductor.config  # a second's import, so not at sample.py's start
        self.inductor_config = torch._inductor.config
        self.steps = weakref.WeakKeyDictionary()  # model -> (key, compiled DecodeStep)
        self.cache = None  # the generation being decoded: its cache, static view, step, token

    def __call__(self, model, token, cache, params):
        bs = model.config.block_size
        if cache.pos >= bs or cache.k[0].size(2) != bs:
            return decode(model, token, cache, params)
        if self.cache is None or self.cache[0] is not cache:  # a new generation or prefill
            pos = torch.zeros(1, dtype=torch.long, device=token.device)
            self.cache = (cache, StaticKVCache(cache.k, cache.v, pos), self.step_for(model, token.size(0)),
                          token.clone(memory_format=torch.contiguous_format))
        _, static, step, fixed_token = self.cache
        static.pos.fill_(cache.pos)
        fixed_token.copy_(token)  # a slice of the sequence: its strides would recompile the step
        # freezing is read when dynamo traces the step (its first call, or a recompile)
        with self.inductor_config.patch(freezing=True):
            logits = step(fixed_token, static, step.serial)
        cache.pos += 1
        return logits

    def step_for(self, model, B):
        """The compiled step for these rows, this autocast dtype and these weights."""
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        key = (B, dtype, model.weights_version())
        held = self.steps.get(model)
        if held is not None and held[0] == key:
            return held[1]
        # max-autotune times inductor's matrix-vector kernel against aten's per shape and keeps
        # the faster: the choice is measured on this machine, whatever its CPU vendor
        step = torch.compile(DecodeStep(model), dynamic=False, options={"max_autotune": True})
        self.steps[model] = (key, step)  # one at a time: each holds a packed copy of the weights
        return step
