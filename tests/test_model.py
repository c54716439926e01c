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
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, sample_next
from optim import param_groups

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
    cached = model.generate(idx, 80, temperature=0, use_cache=True)
    full = model.generate(idx, 80, temperature=0, use_cache=False)
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


SAMPLINGS = [("gpt2", dict(top_k=5)), ("gpt2", dict(top_p=0.7))] + [
    (arch, dict(top_k=20, top_p=0.9)) for arch in ARCHS]


@pytest.mark.parametrize("arch, sampling", SAMPLINGS)
def test_seeded_sampling_same_with_and_without_cache(arch, sampling):
    model = tiny_model(**ARCHS[arch])
    idx = prompts(3, 7)
    runs = [model.generate(idx, 60, temperature=1.0, generator=torch.Generator().manual_seed(7),
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
    runs = {window: model.generate(idx, 90, temperature=1.0, window=window,
                                   generator=torch.Generator().manual_seed(3))
            for window in ("chunked", "exact")}
    assert runs["chunked"].shape == runs["exact"].shape == (3, 7 + 90)
    # identical until the sequence outgrows the block, then the windows differ
    assert torch.equal(runs["chunked"][:, :BLOCK], runs["exact"][:, :BLOCK])
    assert not torch.equal(runs["chunked"], runs["exact"])
    reference = chunked_reference(model, idx, 90, torch.Generator().manual_seed(3))
    assert torch.equal(runs["chunked"], reference)
    with pytest.raises(ValueError, match="window"):
        next(model.generate_stream(idx, 1, window="sliding"))


def test_generate_rejects_prompt_longer_than_block():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model().generate(prompts(1, BLOCK + 1), 1)


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
    assert model.generate(idx[:, :4], 30, temperature=0).shape == (2, 34)  # windows at 16 now
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


def test_probs_attention_matches_sdpa_and_gradcheck():
    """ProbsAttention (bf16 CPU attention) is exact causal attention: gradcheck in float64, and
    outputs and gradients equal to SDPA's in fp32."""
    from model import ProbsAttention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(ProbsAttention.apply, (q, k, v))
    q, k, v = (torch.randn(3, 4, 16, 8, generator=g).requires_grad_() for _ in range(3))
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(3, 4, 16, 8, generator=g)
    y, y_ref = ProbsAttention.apply(q, k, v), F.scaled_dot_product_attention(*ref, is_causal=True)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip((q, k, v), ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("probs_limit", [1 << 24, 0])
def test_cpu_bf16_attention(monkeypatch, probs_limit):
    """Under CPU bf16 autocast, attention is ProbsAttention in bf16 while the probabilities are
    small, else fp32 SDPA of the bf16 inputs rounded once; both are close to fp32 attention."""
    from model import ProbsAttention, attention
    monkeypatch.setattr(ProbsAttention, "PROBS", probs_limit)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, None, True, 0.0, False)
    y_ref = F.scaled_dot_product_attention(*ref, is_causal=True)
    assert y.dtype == torch.bfloat16
    if probs_limit == 0:
        assert torch.equal(y, y_ref.bfloat16())
    torch.testing.assert_close(y.float(), y_ref, rtol=0, atol=0.03)
    grad = torch.randn(2, 4, 16, 8, generator=g)
    y.backward(grad.bfloat16())
    y_ref.backward(grad)
    for got, want in zip((q, k, v), ref):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=0, atol=0.04)


def test_cpu_linear_matches_aten_with_gradients():
    """model.Linear (oneDNN on fp32 CPU) against F.linear: outputs and all three gradients."""
    from model import Linear
    torch.manual_seed(0)
    layer = Linear(48, 80)
    x = torch.randn(3, 7, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref, b_ref = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    y, y_ref = layer(x), torch.nn.functional.linear(x_ref, w_ref, b_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, x_ref.grad), (layer.weight.grad, w_ref.grad), (layer.bias.grad, b_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_slices(monkeypatch):
    """DropoutAttention in slices of 2 heads, so the slicing itself is exercised."""
    from model import DropoutAttention
    monkeypatch.setattr(DropoutAttention, "ROWS", 2 * 16 * 16)
    return DropoutAttention


def test_dropout_attention_without_dropout_is_sdpa(small_slices):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    y = small_slices.apply(q, k, v, 0.0, 5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y, ref)
    grad = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


def test_dropout_attention_gradients_and_masks(small_slices):
    """Backward regenerates forward's masks: gradcheck holds with dropout; a seed fixes the
    masks; about p of the probabilities are dropped."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: small_slices.apply(a, b, c, 0.3, 7), (q, k, v))
    assert torch.equal(small_slices.apply(q, k, v, 0.3, 7), small_slices.apply(q, k, v, 0.3, 7))
    assert not torch.equal(small_slices.apply(q, k, v, 0.3, 7), small_slices.apply(q, k, v, 0.3, 8))
    # with v = 1 a row's output is (kept probability mass) / (1 - p): 1 on average
    ones = torch.ones(8, 4, 64, 8, dtype=torch.float64)
    y = small_slices.apply(torch.zeros_like(ones), torch.zeros_like(ones), ones, 0.3, 1)
    assert abs(y[:, :, 16:].mean().item() - 1.0) < 0.02
