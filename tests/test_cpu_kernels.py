"""
cpu_kernels.py: each CPU kernel against the PyTorch operation it replaces (SDPA, F.linear),
with gradients.
"""
import os

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_probs_attention_matches_sdpa_and_gradcheck():
    """ProbsAttention (bf16 CPU attention) is exact causal attention: gradcheck in float64, and
    outputs and gradients equal to SDPA's in fp32."""
    from gpt_trainer.cpu_kernels import ProbsAttention
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
    from gpt_trainer.cpu_kernels import ProbsAttention, attention
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


def test_cpu_id_picks_onednn_for_amd_zen5_only(tmp_path):
    from gpt_trainer import cpu_kernels
    cpuinfo = str(tmp_path / "cpuinfo")
    for vendor, family in (("AuthenticAMD", 25), ("AuthenticAMD", 26), ("GenuineIntel", 6)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
                                          f"model\t\t: 17\n")
        assert (cpu_kernels.cpu_vendor(cpuinfo), cpu_kernels.cpu_family(cpuinfo)) == (vendor, family)
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # aarch64 has no vendor_id
    assert (cpu_kernels.cpu_vendor(cpuinfo), cpu_kernels.cpu_family(cpuinfo)) == ("", 0)
    missing = str(tmp_path / "missing")  # macOS, Windows
    assert (cpu_kernels.cpu_vendor(missing), cpu_kernels.cpu_family(missing)) == ("", 0)
    has = cpu_kernels.ONEDNN_LINEAR is not None
    assert cpu_kernels.onednn_fp32("AuthenticAMD", 26) == has and cpu_kernels.onednn_fp32("AuthenticAMD", 27) == has
    assert not cpu_kernels.onednn_fp32("AuthenticAMD", 25)  # Zen 4: aten trains faster there
    assert not cpu_kernels.onednn_fp32("GenuineIntel", 6) and not cpu_kernels.onednn_fp32("", 0)


@pytest.mark.parametrize("onednn", [True, False])
def test_linear_follows_onednn_fp32(monkeypatch, onednn):
    from gpt_trainer import cpu_kernels
    if cpu_kernels.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32", onednn)
    layer = cpu_kernels.Linear(16, 8)
    assert ("OneDNNLinear" in type(layer(torch.randn(4, 32, 16, requires_grad=True)).grad_fn).__name__) == onednn
    assert "OneDNNLinear" not in type(layer(torch.randn(1, 31, 16, requires_grad=True)).grad_fn).__name__  # few rows


@pytest.mark.parametrize("n_in,n_out", [(48, 80), (80, 48)])  # both orders of the weight gradient
def test_cpu_linear_matches_aten_with_gradients(monkeypatch, n_in, n_out):
    """cpu_kernels.Linear with oneDNN on (as on AMD CPUs) against F.linear: outputs and all
    three gradients."""
    from gpt_trainer import cpu_kernels
    if cpu_kernels.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32", True)
    torch.manual_seed(0)
    layer = cpu_kernels.Linear(n_in, n_out)
    x = torch.randn(3, 17, n_in, requires_grad=True)  # 51 rows: at least ONEDNN_MIN_ROWS
    x_ref = x.detach().clone().requires_grad_()
    w_ref, b_ref = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    y, y_ref = layer(x), torch.nn.functional.linear(x_ref, w_ref, b_ref)
    assert "OneDNNLinear" in type(y.grad_fn).__name__
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, x_ref.grad), (layer.weight.grad, w_ref.grad), (layer.bias.grad, b_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad.is_contiguous()  # as the fused optimizer and DDP's buckets expect


@pytest.fixture
def small_slices(monkeypatch):
    """DropoutAttention in slices of 2 heads, so the slicing itself is exercised."""
    from gpt_trainer.cpu_kernels import DropoutAttention
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


def watch_logits(monkeypatch, model, probe):
    """probe()'s value at every logits computation of a generation: the prefill's (the lm_head
    module) and each decoding step's (generate.linear over the head's parameters)."""
    from gpt_trainer import generate
    seen, linear = [], generate.linear
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(probe()))

    def watched(x, params, name):
        if name == "lm_head":
            seen.append(probe())
        return linear(x, params, name)
    monkeypatch.setattr(generate, "linear", watched)
    return seen


def test_decoding_turns_onednn_off_for_fp32_cpu_steps_only(monkeypatch):
    from gpt_trainer.cpu_kernels import decoding
    from gpt_trainer.generate import generate
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    seen = watch_logits(monkeypatch, model, lambda: torch.backends.mkldnn.enabled)
    generate(model, torch.zeros(1, 1, dtype=torch.long), 3)
    assert seen == [False] * 3 and torch.backends.mkldnn.enabled  # restored after each step
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls need oneDNN
        with decoding(model.lm_head.weight):
            assert torch.backends.mkldnn.enabled
    with decoding(model.lm_head.weight.double()):
        assert torch.backends.mkldnn.enabled


def test_linear_kernel_choices():
    """Training Linear's and decoding's fp32 kernels: 'auto' is oneDNN on AMD Zen 5 (training)
    and on AMD (decoding) only, and any can be forced."""
    from gpt_trainer import cpu_kernels
    from gpt_trainer.errors import UserError
    has = cpu_kernels.ONEDNN_LINEAR is not None
    assert cpu_kernels.linear_kernel("auto", "AuthenticAMD", 26) == ("onednn" if has else "aten")
    assert cpu_kernels.linear_kernel("auto", "AuthenticAMD", 25) == "aten"
    assert cpu_kernels.linear_kernel("auto", "GenuineIntel", 6) == "aten"
    assert cpu_kernels.linear_kernel("aten", "AuthenticAMD", 26) == "aten"
    if has:
        assert cpu_kernels.linear_kernel("onednn", "GenuineIntel", 6) == "onednn"
        assert cpu_kernels.linear_kernel("onednn", "AuthenticAMD", 25) == "onednn"
    with pytest.raises(UserError, match="GPT_CPU_KERNEL='mkl' is not one of auto, onednn, aten"):
        cpu_kernels.env_choice("GPT_CPU_KERNEL", cpu_kernels.LINEAR_KERNELS, environ={"GPT_CPU_KERNEL": "mkl"})
    # decoding: oneDNN on AMD, aten (MKL's own fast path) elsewhere; a named kernel is kept
    assert cpu_kernels.decode_kernel("auto", "AuthenticAMD") == ("onednn" if has else "aten")
    assert cpu_kernels.decode_kernel("auto", "GenuineIntel") == "aten"
    assert cpu_kernels.decode_kernel("aten_t", "AuthenticAMD") == "aten_t"


@pytest.mark.slow
def test_kernel_environment_variables():
    """What bench.py's --kernel / --decode_kernel / --decode_threads set reaches cpu_kernels in a
    new process (train.py, a sample case); a bad value is one line naming the variable."""
    import subprocess
    import sys
    from gpt_trainer import cpu_kernels
    probe = ("import gpt_trainer.cpu_kernels as k; print(k.ONEDNN_FP32, k.ONEDNN_MIN_ROWS, k.DECODE_KERNEL, "
             "k.DECODE_THREADS)")
    env = dict(os.environ, GPT_CPU_KERNEL="aten", GPT_ONEDNN_MIN_ROWS="4", GPT_DECODE_KERNEL="aten",
               GPT_DECODE_THREADS="2")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "4", "aten", "2"], out.stderr
    if cpu_kernels.ONEDNN_LINEAR is not None:
        env.update(GPT_CPU_KERNEL="onednn", GPT_DECODE_KERNEL="onednn")
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
        assert out.stdout.split()[::2] == ["True", "onednn"], out.stderr
    env["GPT_DECODE_KERNEL"] = "fast"
    p = subprocess.run([sys.executable, "bench.py", "--sample", "--profile"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert p.returncode != 0 and "GPT_DECODE_KERNEL='fast' is not one of auto, aten, aten_t, onednn" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("kernel", ["aten", "aten_t", "onednn"])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_kernels_equal_full_recomputation(monkeypatch, kernel, threads):
    """Every decode matmul kernel, at one and two threads: a decoding step's logits are
    forward()'s, and greedy tokens with the cache equal those of full recomputation; the step
    runs at its thread count and the caller's is restored."""
    from gpt_trainer import cpu_kernels
    from gpt_trainer.generate import decode, decode_params, generate
    from gpt_trainer.kv_cache import KVCache
    from model import GPT, GPTConfig
    if kernel == "onednn" and cpu_kernels.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(cpu_kernels, "DECODE_KERNEL", kernel)
    monkeypatch.setattr(cpu_kernels, "DECODE_THREADS", threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=48, n_layer=2, n_head=4, n_embd=64, bias=True)).eval()
    idx = torch.randint(48, (2, 12))
    caches = [KVCache(2), KVCache(2)]
    for cache in caches:
        model(idx[:, :5], kv_cache=cache)
    params = decode_params(model)
    assert params["blocks"][0]["kernel"] == kernel
    shape = params["blocks"][0]["attn.c_attn.weight"].shape
    assert shape == ((64, 192) if kernel == "aten_t" else (192, 64))  # (in, out) copies for aten_t
    for t in range(5, 12):
        want, _ = model(idx[:, t:t + 1], kv_cache=caches[0])
        torch.testing.assert_close(decode(model, idx[:, t:t + 1], caches[1], params), want, rtol=1e-5, atol=1e-5)
    seen = watch_logits(monkeypatch, model, torch.get_num_threads)
    before = torch.get_num_threads()
    cached = generate(model, idx[:, :3], 20, temperature=0)
    assert seen == [before] + [threads] * 19 and torch.get_num_threads() == before  # the prefill keeps torch's
    assert torch.equal(cached, generate(model, idx[:, :3], 20, temperature=0, use_cache=False))


def test_decode_params_follow_the_weights():
    """aten_t's transposed copies are kept between generate calls and rebuilt once a weight
    changes, so sampling after a training step uses the new weights."""
    from gpt_trainer.generate import decode_params
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    first = decode_params(model, "aten_t")
    assert decode_params(model, "aten_t") is first
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)  # as an optimizer step does, in place
    again = decode_params(model, "aten_t")
    assert again is not first
    assert torch.equal(again["blocks"][0]["mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight.t())
    assert decode_params(model, "aten")["blocks"][0]["mlp.c_fc.weight"] is model.transformer.h[0].mlp.c_fc.weight


def test_onednn_decoding_only_in_plain_fp32(monkeypatch):
    """The oneDNN decode kernel (AMD's default) knows neither autocast nor float64: there a
    decoding step goes through aten, whose matmuls autocast casts, so sampling in bf16 or in
    float64 computes what forward() does."""
    from gpt_trainer import cpu_kernels
    from gpt_trainer.generate import decode_params
    from model import GPT, GPTConfig
    if cpu_kernels.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(cpu_kernels, "DECODE_KERNEL", "onednn")
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    assert decode_params(model)["blocks"][0]["kernel"] == "onednn"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decode_params(model)["blocks"][0]["kernel"] == "aten"
    assert decode_params(model.double())["blocks"][0]["kernel"] == "aten"
