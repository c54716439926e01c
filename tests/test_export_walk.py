"""
Every architecture the trainer can make either exports to a real transformers class whose
logits are ours within 1e-4, or is refused by hf.py with one line naming the option; nothing
is written on a refusal. The walk covers each option of test_model.ARCHS alone, the quick
start's model (config/train_shakespeare_char.py: bias=False, exact GELU) and the Llama/Qwen3
shapes the RoPE options make together.
"""
import os

import pytest
import torch

from gpt_trainer import hf
from model import GPT, GPTConfig
from test_model import ARCHS

transformers = pytest.importorskip("transformers")

TINY = dict(block_size=16, vocab_size=70, n_layer=2, n_head=4, n_embd=32)
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", multiple_of=16)
WALK = {**ARCHS,
        "quick_start": dict(bias=False, mlp="gelu_exact"),
        "llama": dict(LLAMA, bias=False, n_kv_head=2),
        "llama_bias_untied": dict(LLAMA, bias=True, tie_embeddings=False),
        "qwen3": dict(LLAMA, bias=False, qk_norm=True, n_kv_head=1, head_dim=16)}
# the ones a transformers class can hold; a change here is a change users see
EXPORTS = {"gpt2", "gelu_exact", "no_bias", "quick_start", "llama", "llama_bias_untied", "qwen3"}


def random_model(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **options})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norms and biases away from 1 and 0
    return model


@pytest.mark.parametrize("name", list(WALK))
def test_every_architecture_exports_or_is_refused_in_one_line(name, tmp_path):
    model = random_model(WALK[name])
    out = str(tmp_path / "hf")
    try:
        hf.export_model(model, out, source=name)
    except hf.HFError as e:
        assert name not in EXPORTS, f"{name} should export: {e}"
        assert "\n" not in str(e) and "cannot be exported" in str(e)
        assert not os.path.exists(out)
        return
    assert name in EXPORTS, f"{name} exported; add it to EXPORTS"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(TINY["vocab_size"], (2, TINY["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx, all_logits=True)[0]
        assert (theirs(idx).logits - ours).abs().max().item() <= 1e-4
