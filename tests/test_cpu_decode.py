"""
cpu_decode.FrozenDecode (sample.py --compile=True on the CPU): each cached step compiled with
the weights frozen into it computes what the eager step computes, follows a weight change,
and hands back to the eager step past block_size. In float64, as test_model's comparisons:
only a real indexing, masking or staleness mistake can change a token there.
"""
import pytest
import torch

from gpt_trainer.cpu_decode import FrozenDecode
from gpt_trainer.generate import decode, decode_params, generate
from gpt_trainer.kv_cache import KVCache
from test_model import ARCHS, BLOCK, prompts, tiny_model

pytestmark = pytest.mark.slow  # each model compiles for tens of seconds on two cores


@pytest.mark.parametrize("arch", ["gpt2", "llama_like"])
def test_frozen_step_equals_eager_step(arch):
    model = tiny_model(**ARCHS[arch])
    frozen = FrozenDecode()
    with torch.inference_mode():
        eager_cache, frozen_cache = KVCache(model.config.n_layer), KVCache(model.config.n_layer)
        model(prompts(2, 5), kv_cache=eager_cache)
        model(prompts(2, 5), kv_cache=frozen_cache)
        params = decode_params(model)
        steps = prompts(2, 8, seed=2)
        for t in range(steps.size(1)):
            token = steps[:, t:t + 1]  # (B, 1), a strided slice as generate_stream passes it
            expected = decode(model, token, eager_cache, params)
            got = frozen(model, token, frozen_cache, params)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        assert frozen_cache.pos == eager_cache.pos == 13


def test_greedy_tokens_equal_eager_generate():
    model, frozen = tiny_model(), FrozenDecode()
    idx = prompts(2, 3)
    expected = generate(model, idx, 20, temperature=0)
    assert torch.equal(generate(model, idx, 20, temperature=0, decode_fn=frozen), expected)


def test_a_weight_change_compiles_a_new_step():
    """A frozen step holds the weights as constants (in fp32, inductor's kernel reads a packed
    copy): after an in-place change, a training step's, the next generation must decode with
    the new weights, not the copy."""
    model, frozen = tiny_model().float(), FrozenDecode()
    idx = prompts(1, 3)
    with torch.inference_mode():
        first = frozen.step_for(model, 1)
        assert frozen.step_for(model, 1) is first and frozen.step_for(model, 2) is not first
    for _ in range(2):
        with torch.inference_mode():
            eager_cache, frozen_cache = KVCache(model.config.n_layer), KVCache(model.config.n_layer)
            model(idx, kv_cache=eager_cache)
            model(idx, kv_cache=frozen_cache)
            token = prompts(1, 1, seed=3)
            expected = decode(model, token, eager_cache, decode_params(model))
            got = frozen(model, token, frozen_cache, decode_params(model))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.mul_(-1.0)


def test_rope_past_block_size_hands_back_to_eager_step():
    model, frozen = tiny_model(**ARCHS["rope"]), FrozenDecode()
    idx = prompts(1, 4)
    expected = generate(model, idx, BLOCK + 10, temperature=0, window="sliding")
    got = generate(model, idx, BLOCK + 10, temperature=0, window="sliding", decode_fn=frozen)
    assert torch.equal(got, expected)
