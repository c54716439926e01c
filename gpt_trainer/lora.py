"""
LoRA (Hu et al. 2021) as train.py settings: lora_rank, lora_alpha, lora_dropout, lora_targets.

Each targeted Linear of the blocks (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) gets two
parameters beside its frozen weight, lora_A (r, in) and lora_B (out, r), B starting at zero,
and computes  y = x W^T + b + (alpha / r) * dropout(x) A^T B^T  (peft's LoRA, the same names
and shapes). Everything else is frozen; the optimizer holds only the adapters.

Checkpoints hold only the adapters, with the base named in ckpt['lora'] (the HF directory or
GPT-2 name train.py started from) and fingerprinted (sha256 of its tensors), so a resume,
sample or export rebuilds the base and refuses one that changed.

Export (hf.py): merged (W += alpha/r B A) into one HF model; or, with --adapter, the unmerged
base as an HF model plus a peft adapter (adapter_config.json, adapter_model.safetensors) that
PeftModel.from_pretrained loads onto it. Our fused c_attn (q, k, v rows) and swiglu c_fc
(gate, up rows) map to Llama/Qwen3's separate projections exactly: each gets the shared A and
its rows of B. GPT-2's Conv1D layers keep our names (fan_in_fan_out in peft's config).
"""
import hashlib
import json
import math
import os
import re

import torch
import torch.nn as nn

from gpt_trainer.errors import ConfigError, UserError

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# our target -> Llama/Qwen3 modules, each taking a slice of the rows of B
LLAMA_TARGETS = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "attn.c_proj": ("self_attn.o_proj",), "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.c_proj": ("mlp.down_proj",)}


class LoRAError(UserError):
    """A LoRA setting or checkpoint that cannot be used."""


def parse_targets(spec):
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ConfigError(f"lora_targets={spec!r}: expected a comma-separated subset of {', '.join(TARGETS)}")
    return targets


def _lora_hook(module, inputs, output):
    x = module.lora_dropout(inputs[0])
    return output + (x @ module.lora_A.t() @ module.lora_B.t()) * module.lora_scale


def add_lora(model, rank, alpha, dropout, targets):
    """Freeze model and give each targeted Linear an adapter; returns the adapters' names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i, block in enumerate(model.transformer.h):
        for target in parse_targets(targets) if isinstance(targets, str) else targets:
            m = block.get_submodule(target)
            m.lora_A = nn.Parameter(m.weight.new_empty(rank, m.in_features))
            nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))  # peft's init
            m.lora_B = nn.Parameter(m.weight.new_zeros(m.out_features, rank))
            m.lora_scale, m.lora_dropout = alpha / rank, nn.Dropout(dropout)
            m.lora_handle = m.register_forward_hook(_lora_hook)
            names += [f"transformer.h.{i}.{target}.lora_A", f"transformer.h.{i}.{target}.lora_B"]
    model.lora = dict(rank=rank, alpha=float(alpha), dropout=float(dropout),
                      targets=list(parse_targets(targets) if isinstance(targets, str) else targets))
    return names


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A")]


def adapter_state_dict(model):
    return {n: t for n, t in model.state_dict().items() if n.endswith((".lora_A", ".lora_B"))}


@torch.no_grad()
def merge(model):
    """Fold every adapter into its weight and remove it: a plain GPT again (in place)."""
    for _, m in lora_modules(model):
        m.weight += (m.lora_B.float() @ m.lora_A.float() * m.lora_scale).to(m.weight.dtype)
        strip(m)
    del model.lora
    return model


def strip(m):
    m.lora_handle.remove()
    for attr in ("lora_A", "lora_B", "lora_scale", "lora_dropout", "lora_handle"):
        delattr(m, attr)


def remove(model):
    """Drop the adapters unmerged: the base model."""
    for _, m in lora_modules(model):
        strip(m)
    del model.lora
    return model


def base_fingerprint(model):
    """sha256 of the base's tensors (names, shapes, bytes), adapters excluded."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.endswith((".lora_A", ".lora_B")):
            continue
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def build_lora_model(ckpt, path, gpt_from_hf):
    """The model of a LoRA checkpoint: its base rebuilt by gpt_from_hf (hf.py's) from
    ckpt['lora']['base'] (an HF dir or GPT-2 name), checked against the fingerprint, then the
    adapters loaded."""
    info = ckpt["lora"]
    args = ckpt["model_args"]
    if not (os.path.isdir(info["base"]) or info["base"].startswith("gpt2")):
        raise LoRAError(f"{path}: its base model {info['base']} is not found; LoRA checkpoints hold only the "
                        f"adapters, so the base must stay where training read it")
    model = gpt_from_hf(info["base"], dropout=args.get("dropout"))
    model.grow_vocab(args["vocab_size"])
    if args["block_size"] < model.config.block_size:
        model.crop_block_size(args["block_size"])
    if base_fingerprint(model) != info["base_fingerprint"]:
        raise LoRAError(f"{path}: the base model {info['base']} is not the one these adapters were trained on "
                        f"(its weights changed); use the original base")
    add_lora(model, info["rank"], info["alpha"], info["dropout"], info["targets"])
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or [n for n in missing if n.endswith((".lora_A", ".lora_B"))]:
        raise LoRAError(f"{path}: the adapters do not fit the model (missing {missing[:2]}, unexpected {unexpected[:2]})")
    return model


# -----------------------------------------------------------------------------
# peft export

def peft_tensors(model):
    """{peft name: tensor} of the adapters for the HF model hf.export_model writes."""
    out, c = {}, model.config
    for name, m in lora_modules(model):
        _, _, i, target = name.split(".", 3)  # transformer.h.{i}.{target}
        A, B = m.lora_A.detach().clone(), m.lora_B.detach()
        if c.pos_emb != "rope":  # GPT-2: our names are HF's
            prefix = f"base_model.model.transformer.h.{i}.{target}"
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = A, B.clone()
            continue
        theirs = LLAMA_TARGETS[target]
        if target == "attn.c_attn":
            sizes = [c.n_head * c.head_size, c.kv_heads * c.head_size, c.kv_heads * c.head_size]
        else:
            sizes = [B.size(0) // len(theirs)] * len(theirs)
        for hf_name, rows in zip(theirs, B.split(sizes)):
            prefix = f"base_model.model.model.layers.{i}.{hf_name}"
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = A.clone(), rows.clone()
    return out


def export_adapter(model, out_dir, base_dir):
    """adapter_config.json + adapter_model.safetensors in out_dir, for the HF base in base_dir."""
    from safetensors.torch import save_file
    info, gpt2 = model.lora, model.config.pos_emb != "rope"
    names = info["targets"] if gpt2 else [n for t in info["targets"] for n in LLAMA_TARGETS[t]]
    pattern = r".*\.(" + "|".join(re.escape(n) for n in names) + ")"
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": info["rank"], "lora_alpha": info["alpha"],
              "lora_dropout": info["dropout"], "target_modules": pattern, "fan_in_fan_out": gpt2, "bias": "none",
              "base_model_name_or_path": os.path.abspath(base_dir), "inference_mode": True, "use_rslora": False,
              "init_lora_weights": True}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(peft_tensors(model), os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
