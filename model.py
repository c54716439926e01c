"""
A GPT language model in one file. The default GPTConfig is exactly GPT-2 (learned
positions, LayerNorm, GELU, tied embeddings) with the Hugging Face GPT-2 parameter names,
so weights move both ways with a plain name map (see gpt_trainer/hf.py). Every other architecture
option (RoPE, RMSNorm, ReLU^2, SwiGLU, grouped-query attention, QK-norm, untied head,
logit soft-capping) is a GPTConfig field, so a checkpoint's model_args rebuild it exactly.
Generation (the KV cache, the decode step and sampling) is gpt_trainer/generate.py.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from gpt_trainer.cpu_kernels import Linear, attention

RECOMPUTE = ("none", "block", "attn", "mlp")  # activation checkpointing, see GPT.set_recompute
CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
           "mlp": ("gelu", "gelu_exact", "relu2", "swiglu")}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, as GPT-2
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 = n_head
    pos_emb: str = "learned"  # 'learned' (GPT-2) or 'rope'
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm'
    # 'gelu' (GPT-2's tanh approximation), 'gelu_exact' (erf, as nanoGPT's nn.GELU), 'relu2'
    # or 'swiglu'
    mlp: str = "gelu"
    multiple_of: int = 64  # SwiGLU hidden size is rounded up to this
    mlp_hidden: int = 0  # MLP hidden size; 0 = 4 * n_embd (swiglu: 8/3 * n_embd up to a multiple_of)
    head_dim: int = 0  # query/key/value size per head; 0 = n_embd // n_head (Qwen3 decouples them)
    norm_eps: float = 1e-5  # epsilon of every LayerNorm / RMSNorm
    qk_norm: bool = False  # normalise queries and keys per head before attention
    tie_embeddings: bool = True  # lm_head shares wte's weight, as GPT-2
    logit_softcap: float = 0.0  # logits -> c * tanh(logits / c); 0 = off

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.mlp_hidden < 0 or self.head_dim < 0 or self.norm_eps <= 0:
            raise ValueError(f"mlp_hidden={self.mlp_hidden} and head_dim={self.head_dim} must be >= 0 "
                             f"and norm_eps={self.norm_eps} > 0")
        if self.n_embd % self.n_head and not self.head_dim:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and self.head_size % 2:
            raise ValueError(f"pos_emb='rope' needs an even head size, got {self.head_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.rope_theta <= 0 or self.logit_softcap < 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0 and logit_softcap={self.logit_softcap} >= 0")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]


class RMSNorm(nn.Module):
    def __init__(self, ndim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, eps=self.eps)


def make_norm(config, ndim=None):
    ndim = ndim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(ndim, config.norm_eps)
    return nn.LayerNorm(ndim, bias=config.bias, eps=config.norm_eps)


def rope_tables(head_dim, max_len, theta):
    """cos and sin, each (max_len, head_dim // 2), for rotating pairs (x1, x2) of halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos, sin: (T, hs/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, config.n_head, config.kv_heads
        self.head_dim = config.head_size
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = Linear(config.n_embd, qkv_dim, bias=config.bias)  # q, k, v fused
        self.c_proj = Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.dropout, self.block_size, self.qk_norm = config.dropout, config.block_size, config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, self.head_dim), make_norm(config, self.head_dim)

    def forward(self, x, rope=None, kv_cache=None):
        B, T, C = x.size()
        hs = self.head_dim
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, hs).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (B, nh|nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v, self.block_size)
        # A prefill (no past) is plain causal; one new token may see the whole cache; a chunk
        # after a past needs the causal mask shifted by `past`; a sequence longer than the
        # block (RoPE) a band: each token sees the last block_size tokens.
        mask = None
        if past and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        elif T > self.block_size:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().triu(1 - self.block_size)
        y = attention(q, k, v, mask, past == 0 and T > 1 and mask is None,
                      self.dropout if self.training else 0.0, self.n_kv_head != self.n_head)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hs))
        return F.dropout(y, self.dropout) if self.training else y


def activate(kind, h):
    """The MLP's nonlinearity (config.mlp) on the output of its first projection."""
    if kind == "gelu":
        return F.gelu(h, approximate="tanh")  # GPT-2's GELU, so HF logits match
    if kind == "gelu_exact":
        return F.gelu(h)
    if kind == "relu2":
        return F.relu(h).square()
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        if config.mlp == "swiglu":
            # Llama: 2/3 of 4C keeps the parameter count of a 4C GELU MLP
            rounded = config.multiple_of * math.ceil(8 * config.n_embd / 3 / config.multiple_of)
            hidden = config.mlp_hidden or rounded
            self.c_fc = Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and up, fused
        else:
            hidden = config.mlp_hidden or 4 * config.n_embd
            self.c_fc = Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        h = self.c_proj(activate(self.kind, self.c_fc(x)))
        return F.dropout(h, self.dropout) if self.training else h


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.recompute = "none"  # activation checkpointing, see GPT.set_recompute

    def forward(self, x, rope=None, kv_cache=None):
        if self.recompute != "none" and torch.is_grad_enabled():
            return self.checkpointed(x, rope)
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        return x + self.mlp(self.ln_2(x))

    def checkpointed(self, x, rope):
        """forward() keeping for backward only the input of the part self.recompute names (the
        'block', 'attn' or 'mlp'); backward recomputes the rest, with the forward's RNG state,
        so with the same dropout masks."""
        attn = lambda x: x + self.attn(self.ln_1(x), rope)  # noqa: E731
        mlp = lambda x: x + self.mlp(self.ln_2(x))  # noqa: E731
        if self.recompute == "block":
            return checkpoint(lambda x: mlp(attn(x)), x, use_reentrant=False)
        if self.recompute == "attn":
            return mlp(checkpoint(attn, x, use_reentrant=False))
        return checkpoint(mlp, attn(x), use_reentrant=False)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config.head_size, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameters, by default without those that do no matmul (position embeddings,
        and the token embedding when the head is untied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def weights_version(self):
        """A key that changes whenever a parameter is replaced, moved or changed in place (an
        optimizer step): what decoding keys its prepared copies of the weights on."""
        return tuple((id(p), p.data_ptr(), p._version) for p in self.parameters())

    def forward(self, idx, targets=None, kv_cache=None, all_logits=False, sliding=False):
        """Logits for the last position (inference), or for every position with targets or
        all_logits. With kv_cache (a gpt_trainer.kv_cache.KVCache), idx continues the cached
        tokens. sliding=True lets a RoPE model pass block_size: each token attends to the last
        block_size tokens (itself included) in every layer, over a longer idx or, one token at
        a time, a longer cache."""
        B, T = idx.size()
        pos = kv_cache.pos if kv_cache is not None else 0
        sliding = sliding and "wpe" not in self.transformer and (kv_cache is None or T == 1)
        if pos + T > self.config.block_size and not sliding:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = self.rope_at(pos, T)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None and not all_logits:
            x = x[:, -1:, :]
        if targets is None:
            return self.head(x), None
        return self.head_loss(x, targets)

    def head_loss(self, x, targets):
        """(logits, mean cross-entropy over the targets that are not -1) from the last block's
        output; a function of its own so that torch.compile can fuse the fp32 cast into the
        loss (runtime.try_compile compiles it as one region)."""
        logits = self.head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def set_recompute(self, what):
        """Activation checkpointing: 'block' keeps only each block's input for backward and
        recomputes the rest there; 'attn' or 'mlp' does that for one half of each block. The
        last block keeps its activations: backward needs them first, so recomputing them
        would cost time and save no peak memory."""
        if what not in RECOMPUTE:
            raise ValueError(f"recompute={what!r} is not one of {RECOMPUTE}")
        for block in self.transformer.h[:-1]:
            block.recompute = what

    def head(self, x):
        """Logits (B, T, vocab_size) from the last block's output."""
        return self.softcap(self.lm_head(self.transformer.ln_f(x)))

    def softcap(self, logits):
        """logits -> c * tanh(logits / c) with c = config.logit_softcap (Gemma 2); 0 = off."""
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def rope_at(self, pos, T):
        """cos and sin for positions pos..pos+T-1, the tables extended past block_size on demand."""
        n = self.rope_cos.size(0)
        if pos + T > n:
            with torch.inference_mode(False):  # the tables may be used in training later
                cos, sin = rope_tables(self.config.head_size, 2 * (pos + T),
                                       self.config.rope_theta)
                # the positions already there keep their values, so outputs never shift
                self.rope_cos = torch.cat([self.rope_cos, cos[n:].to(self.rope_cos)])
                self.rope_sin = torch.cat([self.rope_sin, sin[n:].to(self.rope_sin)])
        return self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]

    def grow_vocab(self, vocab_size, multiple=64):
        """Rows for ids up to vocab_size (a chat template's special ids past an HF GPT-2's 50257),
        rounded up to a multiple of 64; new rows start at the mean embedding. True if it grew."""
        old = self.config.vocab_size
        if vocab_size <= old:
            return False
        new = -(-vocab_size // multiple) * multiple
        wte, head = self.transformer.wte, self.lm_head
        with torch.no_grad():
            wte.weight = nn.Parameter(torch.cat([wte.weight, wte.weight.mean(0, keepdim=True).expand(new - old, -1)]))
            wte.num_embeddings = new
            if self.config.tie_embeddings:
                head.weight = wte.weight
            else:
                head.weight = nn.Parameter(torch.cat([head.weight, head.weight.new_zeros(new - old, head.in_features)]))
            head.out_features = new
        self.config.vocab_size = new
        return True

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. to fine-tune GPT-2 with a smaller block_size)."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]
        for block in self.transformer.h:
            block.attn.block_size = block_size

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls plus the attention scores
        (PaLM appendix B), with T = block_size."""
        cfg = self.config
        N = self.get_num_params()
        return 6 * N + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * cfg.block_size

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation as a fraction of `peak_flops`; None where the peak is unknown."""
        if not peak_flops or dt <= 0:
            return None
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops
