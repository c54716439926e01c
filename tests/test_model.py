"""
model.py: KV-cache generation against full recomputation for every architecture option,
the sliding windows past block_size, sampling, and model-level bookkeeping.

Generation comparisons run in float64: cached and uncached attention add in different
orders, and a tiny random model has near-tied logits, so float32 could flip a greedy pick
without any bug. float64 leaves only real indexing/masking mistakes to be caught.
"""
import math

import pytest
import torch

from gpt_trainer.generate import decode, decode_params, generate, generate_stream, sample_next
from gpt_trainer.kv_cache import KVCache, StaticKVCache
from model import GPT, GPTConfig
from gpt_trainer.optim import param_groups

BLOCK = 32
TINY = dict(block_size=BLOCK, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
ARCHS = {
    "gpt2": {},
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "gelu_exact": dict(mlp="gelu_exact"),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu", multiple_of=48),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "no_bias": dict(bias=False),
    "softcap": dict(logit_softcap=0.5),
    "head_dim": dict(head_dim=12, n_kv_head=2),  # Qwen3: heads wider than n_embd / n_head
    "llama_like": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True,
                       tie_embeddings=False, bias=False, logit_softcap=2.0),
}



def tiny_model(seed=0, **overrides):
    """A float64 model whose outputs depend strongly on the context: random biases and norm
    gains, and matrices 4x GPT-2's init, so a wrong position or window changes the tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides})).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def prompts(batch, length, vocab=64, seed=1):
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt_len", [1, 7, BLOCK - 3])
def test_greedy_cache_equals_full_recomputation(arch, prompt_len):
    model = tiny_model(**ARCHS[arch])
    idx = prompts(3, prompt_len)
    cached = generate(model, idx, 80, temperature=0, use_cache=True)
    full = generate(model, idx, 80, temperature=0, use_cache=False)
    assert cached.shape == (3, prompt_len + 80)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("arch", ["gpt2", "llama_like"])
def test_cached_logits_equal_full_forward(arch):
    # prefill 5 tokens, a chunk of 4 after them (shifted causal mask), then one token at a time
    model = tiny_model(**ARCHS[arch])
    idx = prompts(2, 20)
    full, _ = model(idx, all_logits=True)
    cache = KVCache(model.config.n_layer)
    pieces = [model(idx[:, :5], kv_cache=cache, all_logits=True)[0],
              model(idx[:, 5:9], kv_cache=cache, all_logits=True)[0]]
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="block_size"):
        model(prompts(2, BLOCK - 19), kv_cache=cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_step_equals_forward(arch):
    """decode() is forward() for one cached token, over plain tensors: the same logits."""
    model = tiny_model(**ARCHS[arch])
    idx = prompts(2, 12)
    caches = [KVCache(model.config.n_layer) for _ in range(2)]
    for cache in caches:
        model(idx[:, :5], kv_cache=cache)
    params = decode_params(model)
    for t in range(5, 12):
        want, _ = model(idx[:, t:t + 1], kv_cache=caches[0])
        torch.testing.assert_close(decode(model, idx[:, t:t + 1], caches[1], params), want, rtol=0, atol=1e-12)
    assert caches[1].pos == 12


def test_training_mode_generation_steps_through_forward():
    """Dropout lives in the modules, so a model in training mode decodes with forward()."""
    model = tiny_model(dropout=0.5).train()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].size(1)))
    generate(model, prompts(1, 3), 5, generator=torch.Generator().manual_seed(0))
    assert calls == [3, 1, 1, 1, 1]
    generate(model.eval(), prompts(1, 3), 5)
    assert calls[5:] == [3]  # then decode() takes the steps


SAMPLINGS = [("gpt2", dict(top_k=5)), ("gpt2", dict(top_p=0.7))] + [
    (arch, dict(top_k=20, top_p=0.9)) for arch in ARCHS]


@pytest.mark.parametrize("arch, sampling", SAMPLINGS)
def test_seeded_sampling_same_with_and_without_cache(arch, sampling):
    model = tiny_model(**ARCHS[arch])
    idx = prompts(3, 7)
    runs = [generate(model, idx, 60, temperature=1.0, generator=torch.Generator().manual_seed(7),
                           use_cache=use_cache, **sampling) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    assert len(set(runs[0][:, 7:].flatten().tolist())) > 5  # really sampled, not a greedy loop


def chunked_reference(model, idx, n, generator):
    """window='chunked' by its definition, without a cache: the context runs from `start` to
    the end; when it would pass block_size it restarts at the last block_size // 2 tokens."""
    seq, start = idx, 0
    for _ in range(n):
        if seq.size(1) - start > BLOCK:
            start = seq.size(1) - BLOCK // 2
        logits, _ = model(seq[:, start:])
        seq = torch.cat([seq, sample_next(logits[:, -1], 1.0, generator=generator)], dim=1)
    return seq


@pytest.mark.parametrize("arch", ["gpt2", "rope", "mqa"])
def test_chunked_window(arch):
    # sampled, not greedy: a tiny random model's greedy output settles into repeating one token,
    # which no context window would change
    model = tiny_model(**ARCHS[arch])
    idx = prompts(3, 7)
    runs = {window: generate(model, idx, 90, temperature=1.0, window=window,
                                   generator=torch.Generator().manual_seed(3))
            for window in ("chunked", "exact")}
    assert runs["chunked"].shape == runs["exact"].shape == (3, 7 + 90)
    # identical until the sequence outgrows the block, then the windows differ
    assert torch.equal(runs["chunked"][:, :BLOCK], runs["exact"][:, :BLOCK])
    assert not torch.equal(runs["chunked"], runs["exact"])
    reference = chunked_reference(model, idx, 90, torch.Generator().manual_seed(3))
    assert torch.equal(runs["chunked"], reference)
    with pytest.raises(ValueError, match="window"):
        next(generate_stream(model, idx, 1, window="rolling"))


def test_generate_rejects_prompt_longer_than_block():
    with pytest.raises(ValueError, match="block_size"):
        generate(tiny_model(), prompts(1, BLOCK + 1), 1)


@pytest.mark.parametrize("field, value", [
    ("pos_emb", "alibi"), ("norm", "batchnorm"), ("mlp", "gelu2"), ("block_size", 0),
    ("n_layer", -1), ("n_head", 5), ("n_kv_head", 3), ("dropout", 1.0)])
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, field: value})


def test_config_rejects_odd_rope_head_size():
    with pytest.raises(ValueError, match="rope"):
        GPTConfig(**{**TINY, "n_embd": 36, "n_head": 12, "pos_emb": "rope"})  # head size 3


@pytest.mark.parametrize("arch", ["gpt2", "rope"])
def test_crop_block_size(arch):
    model = tiny_model(**ARCHS[arch])
    idx = prompts(2, 16)
    before, _ = model(idx, all_logits=True)
    model.crop_block_size(16)
    after, _ = model(idx, all_logits=True)
    assert torch.equal(after, before)  # causal: the first 16 positions do not see the rest
    assert model.config.block_size == 16
    if arch == "gpt2":
        assert model.transformer.wpe.weight.shape == (16, 32)
    assert generate(model, idx[:, :4], 30, temperature=0).shape == (2, 34)  # windows at 16 now
    with pytest.raises(ValueError, match="block_size"):
        model(prompts(2, 17))
    with pytest.raises(ValueError, match="grow"):
        model.crop_block_size(32)


def test_get_num_params_excludes_position_embeddings():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())  # the tied wte/lm_head counted once
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - BLOCK * 32
    untied = tiny_model(tie_embeddings=False)
    total = sum(p.numel() for p in untied.parameters())
    assert untied.get_num_params() == total - BLOCK * 32 - 64 * 32  # wte does no matmul when untied


def names_of(model, groups):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in groups for p in g["params"]]


def test_param_groups_muon_gets_exactly_the_hidden_matrices():
    model = GPT(GPTConfig(**TINY))
    adamw, muon = param_groups(model, weight_decay=0.1, learning_rate=1e-3, optimizer="muon")
    expected = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(names_of(model, muon)) == expected
    rest = names_of(model, adamw)
    all_names = {n for n, _ in model.named_parameters()}  # lm_head.weight is wte's, listed once
    assert len(rest) == len(set(rest)) and set(rest) == all_names - expected
    assert "transformer.wte.weight" in rest and "transformer.wpe.weight" in rest


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_weight_decay_only_on_matrices(optimizer):
    model = GPT(GPTConfig(**TINY, tie_embeddings=False))
    adamw, muon = param_groups(model, weight_decay=0.1, learning_rate=1e-3, optimizer=optimizer)
    for group in adamw + muon:
        dims = {p.dim() for p in group["params"]}
        assert group["weight_decay"] == (0.1 if min(dims) >= 2 else 0.0), (group["weight_decay"], dims)
    seen = [id(p) for g in adamw + muon for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=4, n_head=4, n_embd=256))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            want = 0.02 / math.sqrt(2 * 4)  # GPT-2: the residual stream grows with depth otherwise
        elif p.dim() == 2:
            want = 0.02
        else:
            assert torch.all(p == (1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                                   or name.endswith("ln_f.weight") else 0.0)), name
            continue
        assert abs(p.std().item() - want) < 0.05 * want, name


def test_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "vocab_size": 500}))
    idx = torch.randint(500, (8, BLOCK))
    _, loss = model(idx, targets=torch.roll(idx, -1, dims=1))
    assert abs(loss.item() - math.log(500)) < 0.05


def test_sample_next_greedy_limits():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0), argmax)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=g), argmax)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g), argmax)
    assert sample_next(logits, temperature=1.0, generator=g).shape == (64, 1)


@pytest.mark.parametrize("top_p, allowed", [(0.6, {0, 1}), (0.75, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_token_that_crosses_the_threshold(top_p, allowed):
    # probabilities 0.5, 0.3, 0.15, 0.05: the cumulative sum passes top_p inside the last kept token
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)
    drawn = sample_next(logits, temperature=1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn.flatten(), minlength=4)
    assert {i for i in range(4) if counts[i]} == allowed
    kept = torch.tensor([0.5, 0.3, 0.15, 0.05])[sorted(allowed)]
    expected = kept / kept.sum()
    torch.testing.assert_close(counts[sorted(allowed)] / 4000.0, expected, atol=0.03, rtol=0)


# -----------------------------------------------------------------------------
# window='sliding' (RoPE): the cache slides past block_size. Its definition is forward()
# with sliding=True: every token, in every layer, attends to the last block_size tokens
# (itself included) at its own absolute position (the sequence starts at position 0).

def replayed(model, seq, prompt_len, generator, **sampling):
    """The tokens that sampling from one sliding forward over the finished sequence picks
    at every step, with the same generator: what full recomputation would generate."""
    logits, _ = model(seq[:, :-1], all_logits=True, sliding=True)
    steps = range(prompt_len - 1, seq.size(1) - 1)
    return torch.cat([sample_next(logits[:, t], generator=generator, **sampling) for t in steps], dim=1)


@pytest.mark.parametrize("arch", ["rope", "llama_like"])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=20, top_p=0.9)])
def test_sliding_cache_equals_full_recomputation(arch, sampling):
    model = tiny_model(**ARCHS[arch])
    idx = prompts(3, 7)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].size(1)))
    counted = lambda model, token, *rest: calls.append(token.size(1)) or decode(model, token, *rest)  # noqa: E731
    seq = generate(model, idx, 500, window="sliding", generator=torch.Generator().manual_seed(5),
                   decode_fn=counted, **sampling)
    assert seq.shape == (3, 507) and calls == [7] + [1] * 499  # one prefill, never a recompute
    want = replayed(model, seq, 7, torch.Generator().manual_seed(5), **sampling)
    assert torch.equal(seq[:, 7:], want)
    if sampling["temperature"]:
        assert len(set(seq[:, -100:].flatten().tolist())) > 5  # really sampled, not a greedy loop
    # within the block it is the ordinary cache
    exact = generate(model, idx, BLOCK - 7, generator=torch.Generator().manual_seed(5), **sampling)
    assert torch.equal(seq[:, :BLOCK], exact)


def test_sliding_without_cache_equals_cache():
    model = tiny_model(**ARCHS["llama_like"])
    idx = prompts(2, 3)
    runs = [generate(model, idx, 2 * BLOCK + 5, temperature=1.0, window="sliding", use_cache=use_cache,
                           generator=torch.Generator().manual_seed(2)) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_sliding_positions_convention():
    """Absolute positions: with one layer a token sees exactly its window's tokens, so RoPE's
    relative positions make the sliding logits those of the window recomputed from position 0."""
    model = tiny_model(pos_emb="rope", n_layer=1)
    idx = prompts(2, 3 * BLOCK)
    before, _ = model(idx[:, :BLOCK], all_logits=True)
    logits, _ = model(idx, all_logits=True, sliding=True)
    for p in (BLOCK, BLOCK + 7, 3 * BLOCK - 1):
        window, _ = model(idx[:, p - BLOCK + 1:p + 1])
        # the RoPE tables are fp32: rotating at p or at p - start rounds differently
        torch.testing.assert_close(logits[:, p], window[:, -1], rtol=0, atol=1e-6)
    after, _ = model(idx[:, :BLOCK], all_logits=True)
    assert torch.equal(after, before)  # the same forward again: the tables were extended, not moved
    # a 192-token forward against a 32-token one: other kernels and blockings, so not bitwise
    # (4.4e-16 apart on an AMD EPYC in float64)
    torch.testing.assert_close(logits[:, :BLOCK], before, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="block_size"):
        model(idx)  # only when asked for
    with pytest.raises(ValueError, match="rope"):
        next(generate_stream(tiny_model(), idx[:, :4], 1, window="sliding"))


@pytest.mark.parametrize("arch", ["gpt2", "llama_like"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float64", "bf16_autocast"])
def test_static_cache_decode_equals_sliced_cache(arch, autocast):
    """The fixed-shape step (kv_cache.StaticKVCache: buffers of block_size, the position a
    tensor, unfilled slots masked) computes what the eager step over a sliced cache does; run
    eagerly, without a CUDA graph or compilation. Under bf16 autocast attention takes the CPU's
    bf16 path with the additive mask decode makes once per step."""
    model = tiny_model(**ARCHS[arch])
    tol = 1e-9
    if autocast:  # the same bf16 matmuls both ways; attention's fp32 sums may run over more slots
        model, tol = model.float(), 1e-5
    prompt = prompts(2, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        sliced, static = KVCache(model.config.n_layer), KVCache(model.config.n_layer)
        model(prompt, kv_cache=sliced)
        model(prompt, kv_cache=static)
        static = StaticKVCache(static.k, static.v, torch.tensor([static.pos]))
        params = decode_params(model)
        steps = prompts(2, 6, seed=2)
        for t in range(6):
            token = steps[:, t:t + 1]  # (B, 1)
            expected, got = decode(model, token, sliced, params), decode(model, token, static, params)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        assert int(static.pos) == sliced.pos == 11


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_decode_attention_equals_sdpa(n_kv_head):
    """The compiled CPU step's attention (generate.decode_attention): one query per head over
    a cache, grouped query heads as rows, unfilled slots masked, equals SDPA's."""
    from torch.nn import functional as F
    from gpt_trainer.generate import decode_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, n_kv_head, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = (torch.arange(12) <= 6).view(1, 1, 1, 12)
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=n_kv_head != 4)
        torch.testing.assert_close(decode_attention(q, k, v, m), expected, rtol=1e-12, atol=1e-12)
