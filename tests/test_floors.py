"""
floors.py: the bytes and FLOPs a step cannot avoid, against hand-computed values and against
what GPT.generate really runs; bench.py's floors and fractions from them.
"""
import argparse
import math

import pytest
import torch

import bench
from gpt_trainer import floors, generate as gen
from model import GPT, GPTConfig


def tiny(**kw):
    # 1 layer, C=8, 2 heads, block 4, vocab 10, no biases: every count below is by hand
    return GPT(GPTConfig(**{**dict(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10, bias=False), **kw}))


def test_weight_bytes_by_hand():
    # tied: the head reads all of wte (10 x 8), wpe one row (8); the block: ln_1 8, c_attn 24 x 8,
    # c_proj 8 x 8, ln_2 8, c_fc 32 x 8, mlp.c_proj 8 x 32; ln_f 8
    block = 8 + 24 * 8 + 8 * 8 + 8 + 32 * 8 + 8 * 32
    assert floors.weight_bytes(tiny()) == 4 * (80 + 8 + block + 8)
    # untied: wte one row, the head all of its own 10 x 8
    assert floors.weight_bytes(tiny(tie_embeddings=False)) == 4 * (8 + 80 + 8 + block + 8)
    # RoPE: no position table at all
    assert floors.weight_bytes(tiny(pos_emb="rope")) == 4 * (80 + block + 8)
    assert floors.weight_bytes(tiny().double()) == 8 * (80 + 8 + block + 8)


def test_kv_and_flops_by_hand():
    c = tiny(n_layer=3, n_kv_head=1).config  # GQA: one key/value head of size 4
    assert floors.kv_bytes(c, 5) == 2 * 3 * 1 * 4 * 5 * 4
    assert floors.forward_flops(100, c, 2, 5) == 2 * 100 * 2 + 4 * 3 * 2 * 4 * 2 * 5


@pytest.mark.parametrize("use_cache,window", [(True, "exact"), (True, "chunked"), (True, "sliding"),
                                              (False, "exact"), (False, "sliding")])
def test_generation_steps_are_what_generate_runs(monkeypatch, use_cache, window):
    """(tokens fed, positions attended) per step, recorded from GPT.forward and generate.decode."""
    model = tiny(pos_emb="rope", block_size=8).eval()
    seen = []
    forward, decode = GPT.forward, gen.decode

    def record_forward(self, idx, targets=None, kv_cache=None, all_logits=False, sliding=False):
        T = idx.size(1)
        seen.append((T, min(kv_cache.pos + T, 8) if kv_cache is not None else T))
        return forward(self, idx, targets, kv_cache, all_logits, sliding)

    def record_decode(model, token, cache, params):
        seen.append((1, min(cache.pos + 1, 8)))
        return decode(model, token, cache, params)

    monkeypatch.setattr(GPT, "forward", record_forward)
    monkeypatch.setattr(gen, "decode", record_decode)
    gen.generate(model, torch.zeros(1, 3, dtype=torch.long), 20, use_cache=use_cache, window=window)
    assert floors.generation_steps(8, 3, 20, use_cache, window) == seen


def test_generation_floor_by_hand():
    model = tiny()
    c, w, n = model.config, floors.weight_bytes(model), model.get_num_params()
    # 3 new tokens from a 1-token prompt, cached: a prefill over 1, then steps over 2 and 3
    # positions; at 1e6 B/s and 1e12 FLOP/s every step is a matter of bytes
    want = sum(w + floors.kv_bytes(c, ctx) for ctx in (1, 2, 3)) / 1e6
    assert floors.generation_floor(model, 1, 3, True, "exact", 1e6, 1e12) == pytest.approx(want)
    # uncached at 1e12 B/s and 1e3 FLOP/s: every step is a forward over the whole context
    want = sum(floors.forward_flops(n, c, T, T) for T in (1, 2, 3)) / 1e3
    assert floors.generation_floor(model, 1, 3, False, "exact", 1e12, 1e3) == pytest.approx(want)
    # batch 2 reads the weights once and two caches
    want = sum(w + 2 * floors.kv_bytes(c, ctx) for ctx in (1, 2, 3)) / 1e6
    assert floors.generation_floor(model, 1, 3, True, "exact", 1e6, 1e12, batch=2) == pytest.approx(want)


def test_measured_rates_are_plausible():
    """A copy and matmuls really run: positive rates, the copy counted as read plus written."""
    assert floors.copy_bandwidth(4 << 20, repeats=2) > 1e8
    rates = floors.matmul_rates("float32", n=64, repeats=2)
    assert "aten" in rates and all(r > 1e6 for r in rates.values())


def test_training_floor_and_fraction():
    machine = {"matmul_flops_per_s": {"float32": 100e9, "bfloat16": 300e9}}
    run = bench.with_floor({"flops_per_iter": 6e9, "dtype": "bfloat16", "ms_per_iter": 30.0}, machine)
    assert run["floor_ms_per_iter"] == pytest.approx(20.0)  # 6 GFLOP at 300 GFLOP/s
    assert run["floor_fraction"] == pytest.approx(20.0 / 30.0)
    # an external command (no FLOPs, no dtype) gets the compared run's FLOPs, at the fp32 rate
    ext = bench.with_floor({"flops_per_iter": None, "dtype": None, "ms_per_iter": 120.0}, machine, 6e9)
    assert ext["floor_ms_per_iter"] == pytest.approx(60.0) and ext["floor_fraction"] == pytest.approx(0.5)
