"""
Generation from a GPT: the decode step (forward() for one new token, written over plain
tensors for speed) and sampling, used by sample.py, evaluate.py's callers and bench.py. The
model's forward() takes a kv_cache.KVCache to prefill it or to continue it; everything that
decides what comes next lives here.
"""
import torch
from torch.nn import functional as F

from gpt_trainer import cpu_kernels
from gpt_trainer.cpu_kernels import attention, decode_linear, decode_weight, decoding
from gpt_trainer.kv_cache import KVCache
from model import activate, apply_rope

WINDOWS = ("exact", "chunked", "sliding")  # generation past block_size, see generate_stream


def norm(x, params, name, config):
    """What the norm module `name` (make_norm's) computes, from its parameters in `params`."""
    weight = params[name + ".weight"]
    if config.norm == "rmsnorm":
        return F.rms_norm(x, (x.size(-1),), weight, config.norm_eps)
    return F.layer_norm(x, (x.size(-1),), weight, params.get(name + ".bias"), config.norm_eps)


def linear(x, params, name):
    """A decoding step's Linear `name`; params from decode_params, which holds its weight as
    params['kernel'] reads it (cpu_kernels.decode_linear)."""
    return decode_linear(x, params[name + ".weight"], params.get(name + ".bias"), params["kernel"])


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): greedy at temperature 0, else top-k and/or
    nucleus (top-p) sampling. Returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits, ids = logits.float() / temperature, None
    V = logits.size(-1)
    if (top_k and top_k < V) or (top_p is not None and top_p < 1.0):
        logits, ids = torch.topk(logits, min(top_k or V, V))  # the candidates, most likely first
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:  # keeps the token that crosses top_p
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    # exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is i with probability p_i / sum(p)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)
    choice = probs.div_(race).argmax(dim=-1, keepdim=True)
    return choice if ids is None else ids.gather(-1, choice)


def step_params(model, kernel):
    """{'blocks': per block, its parameters by name ('attn.c_attn.weight', ...) and 'kernel';
    'head': the final norm's and lm_head's, the same way}, each matrix as decode_linear(...,
    kernel) reads it: the weights themselves unless kernel is 'aten_t' (transposed copies)."""
    prepare = lambda named: {**{n: decode_weight(p, kernel) if p.dim() == 2 else p  # noqa: E731
                                for n, p in named}, "kernel": kernel}
    head = [("ln_f." + n, p) for n, p in model.transformer.ln_f.named_parameters()]
    return {"blocks": [prepare(block.named_parameters()) for block in model.transformer.h],
            "head": prepare(head + [("lm_head.weight", model.lm_head.weight)])}


def decode_params(model, kernel=None):
    """What decode() reads, step_params(model, kernel), kept on the model until a parameter
    changes (in place or replaced). On the CPU the kernel is cpu_kernels.DECODE_KERNEL by
    default; elsewhere it is 'aten', and so is 'onednn' outside plain fp32 (its op knows
    neither autocast nor float64). A CUDA graph casts these matrices once (cuda_decode)."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        kernel = "aten"
    kernel = kernel or cpu_kernels.DECODE_KERNEL
    if kernel == "onednn" and (weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        kernel = "aten"
    key = (kernel, model.weights_version())
    cached = getattr(model, "_decode_params", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            model._decode_params = cached = (key, step_params(model, kernel))
    return cached[1]


def decode_attention(q, k, v, mask):
    """What SDPA computes for one query per head, q (B, nh, 1, hs), over the cached keys and
    values (B, nkv, L, hs), written as its three ops for a step compiled on the CPU: inductor
    fuses them into its own kernels, where SDPA stays one opaque call per layer that costs
    more than the work (eagerly, SDPA's one call is the faster). The query heads that share
    a key/value head (GQA) are rows of one matmul."""
    B, nh, _, hs = q.shape
    nkv = k.size(1)
    att = (q.view(B, nkv, nh // nkv, hs) @ k.transpose(-2, -1)) * hs ** -0.5  # (B, nkv, nh/nkv, L)
    if mask is not None:  # (1, 1, 1, L): the slots that take part
        att = att.masked_fill(~mask, float("-inf"))
    return (att.softmax(dim=-1) @ v).view(B, nh, 1, hs)


def decode(model, token, cache, params):
    """Logits (B, 1, V) for token (B, 1) after the tokens in cache: forward() in eval mode
    for one position, written over plain tensors (params from decode_params()). At batch 1
    a step's matmuls are small, so the modules' calls and parameter lookups would be a large
    share of its time (bench.py --sample --profile)."""
    cfg, pos, B = model.config, cache.pos, token.size(0)
    nh, nkv, hs = cfg.n_head, cfg.kv_heads, cfg.head_size
    x = F.embedding(token.view(B), model.transformer.wte.weight)  # (B, C): one row per sample
    rope = None
    if cfg.pos_emb == "learned":  # pos: an int, or a (1,) tensor for a CUDA graph's StaticKVCache
        x = x + model.transformer.wpe.weight[pos]
    elif isinstance(pos, int):
        rope = model.rope_at(pos, 1)
    else:
        rope = model.rope_cos[pos], model.rope_sin[pos]
    mask = cache.mask  # a StaticKVCache's filled slots (1, 1, 1, L): once per step, not per layer
    for layer, p in enumerate(params["blocks"]):
        qkv = linear(norm(x, p, "ln_1", cfg), p, "attn.c_attn").view(B, nh + 2 * nkv, 1, hs)
        q, k, v = qkv.split([nh, nkv, nkv], dim=1)  # (B, nh|nkv, 1, hs)
        if cfg.qk_norm:
            q, k = norm(q, p, "attn.q_norm", cfg), norm(k, p, "attn.k_norm", cfg)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(layer, k, v, cfg.block_size)
        if torch.compiler.is_compiling() and q.device.type == "cpu":  # FrozenDecode's step
            y = decode_attention(q, k, v, mask)
        else:  # one query sees the whole cache
            if mask is not None and mask.dtype == torch.bool:  # SDPA would make this in every layer
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            y = attention(q, k, v, mask, False, 0.0, nkv != nh)
        x = x + linear(y.view(B, nh * hs), p, "attn.c_proj")  # (B, nh, 1, hs) as (B, nh*hs)
        h = activate(cfg.mlp, linear(norm(x, p, "ln_2", cfg), p, "mlp.c_fc"))
        x = x + linear(h, p, "mlp.c_proj")
    cache.pos += 1
    # model.head's computation over params: a CUDA graph's cast lm_head, not one cast per step
    logits = linear(norm(x, params["head"], "ln_f", cfg), params["head"], "lm_head")
    return model.softcap(logits).unsqueeze(1)  # (B, 1, V)


@torch.inference_mode()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                    generator=None, use_cache=True, window="exact", vocab_limit=None, cuda_graphs=True,
                    decode_fn=None):
    """Yield the next token for every row, (B, 1), max_new_tokens times; idx (B, T) holds at
    most block_size tokens. The prompt is prefilled into a KV cache once, then each step
    feeds one token. Past block_size, window='exact' is a forward over the last block_size
    tokens (learned positions change every cached key, so the window is recomputed);
    'chunked' keeps the last half block and re-prefills (faster, a shorter context);
    'sliding' (RoPE) keeps decoding from the cache, as forward(sliding=True) computes.
    vocab_limit: sample only ids below it (a padded vocabulary has ids no tokenizer knows).
    cuda_graphs: on CUDA, replay each cached step as a CUDA graph ('compile': of the
    torch.compile'd step); False runs it eagerly. decode_fn: the function of a cached step,
    decode by default (sample.py passes a torch.compile'd one)."""
    decode_fn = decode_fn or decode
    if window not in WINDOWS:
        raise ValueError(f"window={window!r} is not one of {WINDOWS}")
    sliding = window == "sliding"
    if sliding and "wpe" in model.transformer:
        raise ValueError("window='sliding' needs pos_emb='rope' (learned positions end at block_size)")
    bs, (B, T) = model.config.block_size, idx.shape
    if T > bs:
        raise ValueError(f"prompt of {T} tokens exceeds block_size {bs}")
    seq = idx.new_empty(B, T + max_new_tokens)  # the whole output, filled in place
    seq[:, :T] = idx
    cache, params = None, decode_params(model)
    graphs = None  # on CUDA each cached step within block_size is one CUDA graph replay
    if use_cache and cuda_graphs and idx.device.type == "cuda" and not model.training:
        from gpt_trainer.cuda_decode import graph_decoder
        graphs = graph_decoder(model, B, compile=cuda_graphs == "compile")
    for L in range(T, T + max_new_tokens):  # L tokens so far
        one = use_cache and cache is not None and (cache.pos < bs or sliding)
        with decoding(model.lm_head.weight, threads=None if one else 0):  # DECODE_THREADS for one
            if not use_cache:
                logits, _ = model(seq[:, 0 if sliding else max(0, L - bs):L], sliding=sliding)
            elif cache is not None and (cache.pos < bs or sliding):
                step = seq[:, L - 1:L]  # dropout, if training, needs the modules
                if model.training:
                    logits = model(step, kv_cache=cache, sliding=sliding)[0]
                elif graphs is not None and cache.pos < bs:
                    logits = graphs.step(model, decode_fn, params, step, cache)
                else:
                    logits = decode_fn(model, step, cache, params)
            else:
                keep = bs if (window != "chunked" or L <= bs) else max(1, bs // 2)
                cache = graphs.new_cache(KVCache, model.config.n_layer) if graphs else KVCache(model.config.n_layer)
                logits, _ = model(seq[:, max(0, L - keep):L], kv_cache=cache)
        next_token = sample_next(logits[:, -1, :vocab_limit], temperature, top_k, top_p, generator)
        seq[:, L:L + 1] = next_token
        yield next_token


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             generator=None, use_cache=True, window="exact", vocab_limit=None, cuda_graphs=True,
             decode_fn=None):
    """idx (B, T) followed by max_new_tokens sampled tokens, (B, T + max_new_tokens)."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p,
                               generator, use_cache, window, vocab_limit, cuda_graphs, decode_fn))
    return torch.cat([idx] + new, dim=1)
