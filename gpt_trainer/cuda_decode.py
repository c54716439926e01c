"""
Decoding on CUDA as one CUDA graph replay per token. At batch 1 a decoding step is a few
hundred tiny kernels, and launching them from Python costs more than running them; a graph
launches the whole step at once. A graph needs fixed shapes and addresses, so its KV cache
is preallocated at block_size with the position held on the device, and attention masks the
slots not yet filled (StaticKVCache), where the eager step slices the cache instead.
"""
import weakref

import torch

from gpt_trainer.kv_cache import StaticKVCache


class GraphDecoder:
    """A decoding step (generate.decode, or a compiled one) for a batch of B rows captured as a CUDA graph, with its own KV cache
    buffers; a generation prefills them through new_cache() and then calls step() per token.
    Captured under the autocast state of the first step, so a decoder serves one dtype.
    Everything the graph reads lives here: the cache, the position, the input token, and
    under autocast the matrices already cast (autocast's own cast cache dies with its context)."""

    def __init__(self, compile=False):
        self.compile = compile
        self.k = self.v = self.graph = None

    def new_cache(self, cache_cls, n_layer):
        """An empty cache_cls (kv_cache.KVCache) over this decoder's buffers, for the prefill."""
        cache = cache_cls(n_layer)
        if self.k is not None:
            cache.k, cache.v = list(self.k), list(self.v)
        return cache

    def step(self, model, decode_fn, params, token, cache):
        """Logits (B, 1, V) for token (B, 1) at position cache.pos, as decode_fn(model, token,
        cache, params) computes them; advances cache.pos. The first call captures the graph."""
        if self.graph is None:
            self.capture(model, decode_fn, params, token, cache)
        self.pos.fill_(cache.pos)
        self.token.copy_(token)
        self.graph.replay()
        cache.pos += 1
        return self.logits

    def capture(self, model, decode_fn, params, token, cache):
        self.k, self.v = list(cache.k), list(cache.v)  # the prefill allocated them at block_size
        self.pos = torch.zeros(1, dtype=torch.long, device=token.device)
        self.token = token.clone()
        self.static = StaticKVCache(self.k, self.v, self.pos)
        self.params = params
        autocast = torch.is_autocast_enabled("cuda")
        if autocast:
            dtype = torch.get_autocast_dtype("cuda")
            cast = lambda part: {k: p.to(dtype) if torch.is_tensor(p) and p.dim() == 2 else p  # noqa: E731
                                 for k, p in part.items()}
            self.params = {"blocks": [cast(block) for block in params["blocks"]], "head": cast(params["head"])}
        fn = torch.compile(decode_fn, dynamic=False) if self.compile else decode_fn
        decode = lambda token, cache, params: fn(model, token, cache, params)  # noqa: E731
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuBLAS workspaces, compilation, autotuning
                for _ in range(3):
                    self.pos.fill_(cache.pos)  # the slot it writes is the next step's: overwritten then
                    decode(self.token, self.static, self.params)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = decode(self.token, self.static, self.params)


DECODERS = weakref.WeakKeyDictionary()  # model -> {key: GraphDecoder}


def graph_decoder(model, B, compile=False):
    """The model's GraphDecoder for B rows under the current autocast state, made once per
    model and kept while its weights stay where they are and unchanged (a training step,
    which changes them in place, or a move makes a new one)."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    key = (B, dtype, model.lm_head.weight.dtype, hash(model.weights_version()), compile)
    decoders = DECODERS.setdefault(model, {})
    if key not in decoders:
        if len(decoders) >= 4:  # each holds a KV cache of block_size
            decoders.pop(next(iter(decoders)))
        decoders[key] = GraphDecoder(compile)  # B is fixed by the first capture
    return decoders[key]
