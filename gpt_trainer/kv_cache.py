"""
The KV caches a decoding step reads and writes: KVCache, sliced to the tokens seen (the eager
step), and StaticKVCache, of fixed shapes (a CUDA graph's step, a frozen compiled one).
"""
import torch


class KVCache:
    """Keys and values of every layer for the tokens seen so far, (B, n_kv_head, block_size, hs)
    each, filled by a prefill and then one token per decode step. Past block_size (RoPE only,
    one token at a time) it is a ring: a new token replaces the oldest, so the cache holds the
    last block_size tokens, which one query attends to in any order."""

    mask = None  # every cached slot is attended to (a StaticKVCache masks the unfilled ones)

    def __init__(self, n_layer):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.pos = 0  # tokens already cached (the absolute position of the next one)

    def update(self, layer, k, v, size):
        if self.k[layer] is None:
            B, nkv, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nkv, size, hs)
            self.v[layer] = v.new_zeros(B, nkv, size, hs)
        T = k.size(2)
        slot = self.pos % size if self.pos + T > size else self.pos
        self.k[layer].narrow(2, slot, T).copy_(k)  # narrow: a decode step's few ops add up
        self.v[layer].narrow(2, slot, T).copy_(v)
        end = min(self.pos + T, size)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)


class StaticKVCache:
    """The KVCache interface that decode uses, over preallocated buffers (n_layer lists of
    (B, n_kv_head, block_size, hs)), with `pos` a (1,) long tensor on the device: a step of
    fixed shapes, as a CUDA graph (cuda_decode) and a frozen compiled step (cpu_decode) need.
    Attention masks the slots not yet filled, where the eager step slices the cache."""

    def __init__(self, k, v, pos):
        self.k, self.v, self.pos = k, v, pos
        self.slots = torch.arange(k[0].size(2), device=pos.device)

    @property
    def mask(self):  # (1, 1, 1, block_size): the filled slots, the new token's included
        return (self.slots <= self.pos).view(1, 1, 1, -1)

    def update(self, layer, k, v, size):
        # under autocast a normed key can be fp32 while the buffer has the prefill's dtype
        self.k[layer].index_copy_(2, self.pos, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.pos, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]
