"""
CPU speed kernels used by model.py. Each computes exactly what its plain PyTorch
counterpart computes (same parameters, same IEEE arithmetic class); they only change how
the CPU gets there. Why and how much each one pays is measured in docs/benchmarks.md.
"""
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt_trainer.errors import UserError


def cpu_field(name, cpuinfo="/proc/cpuinfo"):
    """The first `name` field of /proc/cpuinfo ('vendor_id': 'GenuineIntel', 'AuthenticAMD';
    'cpu family': '25'); '' where there is none (aarch64 has no vendor_id, macOS no file)."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.split(":", 1)[0].strip() == name), "")
    except OSError:
        return ""


def cpu_vendor(cpuinfo="/proc/cpuinfo"):
    return cpu_field("vendor_id", cpuinfo)


def cpu_family(cpuinfo="/proc/cpuinfo"):
    """The x86 CPU family number (AMD: 25 = Zen 3 and Zen 4, 26 = Zen 5); 0 where unknown."""
    family = cpu_field("cpu family", cpuinfo)
    return int(family) if family.isdigit() else 0


ONEDNN_LINEAR = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
                 if torch.backends.mkldnn.is_available() else None)


def onednn_fp32(vendor, family):
    """Whether training Linear's fp32 matmuls go through oneDNN on this CPU. aten's are MKL's
    on x86. On an AMD Zen 5 (family 26), whose AVX-512 units are full width, MKL keeps to
    narrower paths and oneDNN trains faster; on a Zen 4 (family 25) MKL's matmul rate is
    close to oneDNN's and aten trains faster, as on an Intel Xeon (docs/cpu_speed.md has
    each A/B)."""
    return ONEDNN_LINEAR is not None and vendor == "AuthenticAMD" and family >= 26


# Every vendor- or size-specific choice below can be forced by an environment variable, so
# that `python bench.py ... --kernel=aten,onednn` (or --decode_kernel, --decode_threads)
# re-decides it on a new machine in one command (docs/benchmarks.md).
LINEAR_KERNELS = ("auto", "onednn", "aten")
DECODE_KERNELS = ("auto", "aten", "aten_t", "onednn")


def env_choice(name, allowed, default="auto", environ=None):
    value = (os.environ if environ is None else environ).get(name, default)
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


def linear_kernel(setting, vendor, family):
    """'onednn' or 'aten' for Linear's fp32 CPU matmuls of ONEDNN_MIN_ROWS rows or more."""
    if setting == "onednn" and ONEDNN_LINEAR is None:
        raise UserError("GPT_CPU_KERNEL=onednn but this torch has no oneDNN (torch.ops.mkldnn)")
    if setting == "auto":
        return "onednn" if onednn_fp32(vendor, family) else "aten"
    return setting


def decode_kernel(setting, vendor):
    """How a decoding step's matmuls run (x is one row per sample): 'aten' (F.linear on the
    (out, in) weight), 'aten_t' (x @ a contiguous (in, out) copy of the weight) or 'onednn'.
    'auto' picks per vendor what was measured fastest on it: oneDNN on AMD EPYCs (Zen 4 and
    Zen 5), whose matrix-vector products stream the weights faster there with two threads,
    and aten (MKL's own fast path) on an Intel Xeon (docs/cpu_speed.md has the A/Bs)."""
    if setting == "onednn" and ONEDNN_LINEAR is None:
        raise UserError("GPT_DECODE_KERNEL=onednn but this torch has no oneDNN (torch.ops.mkldnn)")
    if setting == "auto":
        return "onednn" if ONEDNN_LINEAR is not None and vendor == "AuthenticAMD" else "aten"
    return setting


VENDOR, FAMILY = cpu_vendor(), cpu_family()
ONEDNN_FP32 = linear_kernel(env_choice("GPT_CPU_KERNEL", LINEAR_KERNELS), VENDOR, FAMILY) == "onednn"
# below this many rows (a short prompt's prefill, forward() of one token) Linear stays on aten;
# decoding steps choose their own kernel (DECODE_KERNEL)
ONEDNN_MIN_ROWS = int(os.environ.get("GPT_ONEDNN_MIN_ROWS", 32))
DECODE_KERNEL = decode_kernel(env_choice("GPT_DECODE_KERNEL", DECODE_KERNELS), VENDOR)
# threads of a decoding step; 0 = torch's, as every other op. 1 is the choice where other
# processes keep the cores busy: a step is ~150 small ops, and with two OpenMP threads each
# parallel op's join waits for a core another process holds (docs/cpu_speed.md)
DECODE_THREADS = int(os.environ.get("GPT_DECODE_THREADS", 0))


def decode_weight(weight, kernel):
    """A Linear's weight as decode_linear(..., kernel) reads it."""
    return weight.t().contiguous() if kernel == "aten_t" else weight


def decode_linear(x, weight, bias, kernel):
    """x @ W.T + b for a decoding step's rows x (B, in); weight from decode_weight(W, kernel)."""
    if kernel == "aten_t":
        return x @ weight if bias is None else torch.addmm(bias, x, weight)
    if kernel == "onednn" and not torch.compiler.is_compiling():  # inductor lowers F.linear itself
        return ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)  # 'onednn' keeps the (out, in) weight: the same call


@contextmanager
def decoding(weight, threads=None):
    """For decoding steps of a model with this weight: oneDNN off when it runs in fp32 on the
    CPU, where at a few rows oneDNN's per-call cost exceeds the work (exact GELU goes
    through it by default), and DECODE_THREADS threads on the CPU."""
    threads = DECODE_THREADS if threads is None else threads
    enabled, before = torch.backends.mkldnn.enabled, torch.get_num_threads()
    cpu = weight.device.type == "cpu"
    if cpu and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        torch.backends.mkldnn.enabled = False
    if cpu and threads and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class OneDNNLinear(torch.autograd.Function):
    """y = x @ W.T + b and its two backward matmuls, each one fp32 oneDNN call on strided views."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = ONEDNN_LINEAR(x.reshape(-1, x.size(-1)), weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        gy = grad_y.reshape(-1, grad_y.size(-1))  # (B*T, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # gy @ W = linear(gy, W.T)
            grad_x = ONEDNN_LINEAR(gy, weight.t(), None, "none", [], "").view(x.shape)
        if ctx.needs_input_grad[1]:
            # oneDNN copies its first operand to contiguous rows when it is a transposed view, so
            # the smaller of gy.T @ x = linear(gy.T, x.T) and (x.T @ gy).T = linear(x.T, gy.T).T
            # goes first: a (768, 512) copy costs as much as half the matmul (docs/cpu_speed.md)
            xt = x.reshape(-1, x.size(-1)).t()
            if x.size(-1) < gy.size(-1):
                grad_w = ONEDNN_LINEAR(xt, gy.t(), None, "none", [], "").t().contiguous()
            else:
                grad_w = ONEDNN_LINEAR(gy.t(), xt, None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose fp32 CPU matmuls of ONEDNN_MIN_ROWS rows or
    more go through oneDNN instead of aten's BLAS where ONEDNN_FP32 says so."""

    def forward(self, x):
        # torch.compile lowers F.linear itself (its oneDNN lowering wants frozen weights)
        if (ONEDNN_FP32 and x.numel() >= ONEDNN_MIN_ROWS * x.size(-1)
                and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class DropoutAttention(torch.autograd.Function):
    """Causal attention with dropout, a slice of heads at a time in fp32, keeping only q, k, v
    and a (B, nh, T) log-sum-exp: backward recomputes the probabilities and regenerates the
    dropout masks from a seed, as flash attention does (SDPA's CPU flash kernel has no
    dropout, and its math path keeps several (B, nh, T, T) tensors per layer)."""
    ROWS = 1 << 22  # scores per slice

    @staticmethod
    def slices(q, seed):
        """(start, end, generator) per slice; the same sequence in forward and backward."""
        BH, T = q.size(0) * q.size(1), q.size(2)
        step = max(1, DropoutAttention.ROWS // (T * T))
        g = torch.Generator().manual_seed(seed)
        return [(i, min(i + step, BH), g) for i in range(0, BH, step)]

    @staticmethod
    def probs(q, k, lse, p, g):
        """Softmax probabilities (n, T, T) of causal scores, and their dropout keep-mask."""
        T = q.size(1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.size(-1))
        scores.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        if lse is None:
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        keep = torch.rand(scores.shape, generator=g) >= p
        return scores.sub_(lse).exp_(), keep, lse

    @staticmethod
    def forward(ctx, q, k, v, p, seed):
        B, nh, T, hs = q.shape
        work = torch.promote_types(q.dtype, torch.float32)  # bf16 in, fp32 math
        flat = [t.reshape(B * nh, T, hs) for t in (q, k, v)]
        y, lse = torch.empty(B * nh, T, hs, dtype=work), torch.empty(B * nh, T, 1, dtype=work)
        for i, j, g in DropoutAttention.slices(q, seed):
            qs, ks, vs = (t[i:j].to(work) for t in flat)
            prob, keep, lse[i:j] = DropoutAttention.probs(qs, ks, None, p, g)
            y[i:j] = (prob * keep) @ vs / (1 - p)
        ctx.save_for_backward(q, k, v, lse)
        ctx.p, ctx.seed = p, seed
        return y.view(B, nh, T, hs).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        q, k, v, lse = ctx.saved_tensors
        p, (B, nh, T, hs), work = ctx.p, q.shape, lse.dtype
        flat = [t.reshape(B * nh, T, hs) for t in (q, k, v, grad_y)]
        grads = [torch.empty(B * nh, T, hs, dtype=work) for _ in range(3)]
        for i, j, g in DropoutAttention.slices(q, ctx.seed):
            qs, ks, vs, dy = (t[i:j].to(work) for t in flat)
            prob, keep, _ = DropoutAttention.probs(qs, ks, lse[i:j], p, g)
            dropped = prob * keep / (1 - p)
            grads[2][i:j] = dropped.transpose(1, 2) @ dy
            dprob = (dy @ vs.transpose(1, 2)) * keep / (1 - p)
            dscores = prob * (dprob - (dprob * prob).sum(-1, keepdim=True)) / math.sqrt(hs)
            grads[0][i:j], grads[1][i:j] = dscores @ ks, dscores.transpose(1, 2) @ qs
        return (*(gr.view(B, nh, T, hs).to(q.dtype) for gr in grads), None, None)


class ProbsAttention(torch.autograd.Function):
    """Causal attention in bf16 that keeps the (B*nh, T, T) probabilities for backward: two
    bf16 batched matmuls each way and a softmax (fp32 inside), as GPU flash attention does in
    bf16. Used while the probabilities are small (PROBS)."""
    PROBS = 1 << 24  # probabilities per layer, at most

    @staticmethod
    def forward(ctx, q, k, v):
        B, nh, T, hs = q.shape
        q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))
        causal = torch.full((T, T), float("-inf"), dtype=q.dtype).triu(1)
        scores = torch.baddbmm(causal.expand(B * nh, T, T), q, k.transpose(1, 2), alpha=hs ** -0.5)
        prob = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(q, k, v, prob)
        return torch.bmm(prob, v).view(B, nh, T, hs)

    @staticmethod
    def backward(ctx, grad_y):
        q, k, v, prob = ctx.saved_tensors
        dy = grad_y.reshape(q.shape)  # (B*nh, T, hs)
        grad_v = torch.bmm(prob.transpose(1, 2), dy)
        dscores = torch._softmax_backward_data(torch.bmm(dy, v.transpose(1, 2)), prob, -1, prob.dtype)
        grad_q = torch.bmm(dscores, k).mul_(q.size(-1) ** -0.5)
        grad_k = torch.bmm(dscores.transpose(1, 2), q).mul_(q.size(-1) ** -0.5)
        return tuple(g.view(grad_y.shape) for g in (grad_q, grad_k, grad_v))


def attention(q, k, v, mask, is_causal, dropout_p, enable_gqa):
    """(B, nh, T, hs) attention through SDPA, except on CPU: training with dropout goes through
    DropoutAttention, and bf16 through ProbsAttention, or SDPA in fp32 when T is long."""
    if q.device.type == "cpu" and dropout_p > 0 and is_causal and mask is None:
        if enable_gqa:
            k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
        seed = int(torch.randint(2**62, (), dtype=torch.int64))  # from the global RNG: resumable
        return DropoutAttention.apply(q, k, v, dropout_p, seed)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        B, nh, T, _ = q.shape
        if is_causal and mask is None and k.size(2) == T and B * nh * T * T <= ProbsAttention.PROBS:
            if enable_gqa:
                k, v = (t.repeat_interleave(nh // t.size(1), dim=1) for t in (k, v))
            return ProbsAttention.apply(q, k, v)
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back
            mask = mask if mask is None or mask.dtype == torch.bool else mask.float()  # an additive one
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               is_causal=is_causal, dropout_p=dropout_p,
                                               enable_gqa=enable_gqa)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          dropout_p=dropout_p, enable_gqa=enable_gqa)
