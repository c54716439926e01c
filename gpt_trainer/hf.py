"""
Hugging Face <-> our GPT, both directions, for three transformers architectures:

  GPT2LMHeadModel   the default GPTConfig: our parameter names are HF's, but HF's Conv1D
                    layers store their weights as (in, out), the transpose of nn.Linear's
  LlamaForCausalLM  pos_emb='rope', norm='rmsnorm', mlp='swiglu', any n_kv_head and head_dim,
                    tied or untied embeddings (SmolLM2, TinyLlama, ...)
  Qwen3ForCausalLM  the same with qk_norm=True (Qwen3-0.6B, ...)

Our fused c_attn is HF's q_proj, k_proj and v_proj stacked along the output rows, and c_fc is
gate_proj and up_proj. Both RoPEs rotate halves (x1, x2) of each head, with the same
frequencies. What our GPT cannot compute (rope scaling, sliding windows, ...) is refused by
name, never dropped.

    model = gpt_from_hf("gpt2")          # GPT-2 from the hub, or a local dir of any of the three
    python export.py --ckpt=out/ckpt.pt --out=out/hf   # a checkpoint -> a transformers directory
"""
import json
import os
import sys

import torch

from gpt_trainer.errors import HFError
from model import GPT, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# model_type in config.json -> the transformers class whose checkpoints we read and write
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# HF activation_function -> our mlp; gelu_pytorch_tanh is the same tanh GELU as gelu_new
HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers
# the files tiktoken's own gpt2 encoding reads; they are GPT-2's vocab.json and merges.txt
GPT2_ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_MERGES_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_EOT = 50256
# Llama / Qwen3: our name in block i -> HF's names in model.layers.i, stacked along dim 0
LLAMA_LAYER = {
    "ln_1.weight": ("input_layernorm.weight",),
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.c_attn.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.c_proj.weight": ("self_attn.o_proj.weight",),
    "attn.c_proj.bias": ("self_attn.o_proj.bias",),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
    "ln_2.weight": ("post_attention_layernorm.weight",),
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.c_fc.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.c_proj.weight": ("mlp.down_proj.weight",),
    "mlp.c_proj.bias": ("mlp.down_proj.bias",),
}
LLAMA_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}


def check_hf_overrides(overrides):
    """HF weights fix the architecture: of the GPTConfig fields only dropout may be set."""
    for key in overrides:
        if key in GPTConfig.field_names() and key != "dropout":
            raise HFError(f"{key} cannot be overridden when initialising from Hugging Face weights "
                          f"(only dropout and a smaller block_size can); drop --{key}")


def read_config_json(hf_dir):
    """config.json of a save_pretrained directory, as a dict."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise HFError(f"{path} not found; expected a directory written by save_pretrained")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise HFError(f"{path}: not valid JSON ({e})")


def gpt_from_hf(name_or_dir, dropout=None):
    """Our GPT with the weights of GPT-2 (a hub name, downloaded by transformers) or of a local
    directory holding an HF GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM.
    vocab_size is HF's (50257 for OpenAI's GPT-2)."""
    if not os.path.isdir(name_or_dir):
        if name_or_dir not in GPT2_NAMES:
            raise HFError(f"{name_or_dir!r} is neither one of {', '.join(GPT2_NAMES)} nor a directory")
        return gpt2_from_hf(name_or_dir, dropout)
    raw = read_config_json(name_or_dir)
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFError(f"{os.path.join(name_or_dir, 'config.json')}: model_type={model_type!r}; only "
                      f"{', '.join(map(repr, ARCHITECTURES))} models can be loaded")
    if model_type == "gpt2":
        return gpt2_from_hf(name_or_dir, dropout)
    want = ARCHITECTURES[model_type]
    for arch in raw.get("architectures") or [want]:
        if arch != want:
            raise HFError(f"{name_or_dir}: architectures={arch!r} is not supported; only {want!r} "
                          f"(a causal LM head) for model_type={model_type!r}")
    return llama_from_hf(name_or_dir, dropout)


# -----------------------------------------------------------------------------
# GPT-2: through transformers' GPT2LMHeadModel (which also downloads the hub's GPT-2s)

def convert_state_dict(state_dict):
    """Our state dict <-> HF GPT-2's (the map is its own inverse): same names, Conv1D weights
    transposed, HF's mask buffers dropped."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith(HF_BUFFERS):
            continue
        out[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    return out


def config_from_hf(hf_config, source, dropout=None):
    """GPTConfig for an HF GPT2Config, refusing the variants our GPT does not compute."""
    mlp = HF_ACTIVATIONS.get(hf_config.activation_function)
    if mlp is None:
        raise HFError(f"{source}: activation_function={hf_config.activation_function!r} is not "
                      f"supported; only {', '.join(map(repr, HF_ACTIVATIONS))}")
    required = {"scale_attn_weights": True, "tie_word_embeddings": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "add_cross_attention": False}
    for key, want in required.items():
        got = getattr(hf_config, key, want)
        if got != want:
            raise HFError(f"{source}: {key}={got!r} is not supported; only {key}={want!r} (GPT-2's)")
    try:
        return GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                         n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                         dropout=0.0 if dropout is None else dropout, bias=True, mlp=mlp,
                         mlp_hidden=hf_config.n_inner or 0, norm_eps=hf_config.layer_norm_epsilon)
    except ValueError as e:
        raise HFError(f"{source}: {e}")


def last_line(e):
    """The line of an exception's message that says what is wrong (transformers' config
    validation puts it last, under a header)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def gpt2_from_hf(name_or_dir, dropout=None):
    import pickle
    from transformers import GPT2Config, GPT2LMHeadModel
    try:
        hf_config = GPT2Config.from_pretrained(name_or_dir)
    except OSError as e:
        raise HFError(f"cannot load {name_or_dir!r} from the Hugging Face hub ({str(e).splitlines()[0]}); "
                      f"go online once (it is cached afterwards) or pass a local directory")
    except Exception as e:  # transformers' validation of config.json's values
        raise HFError(f"{name_or_dir}: config.json is not valid ({last_line(e)})")
    config = config_from_hf(hf_config, name_or_dir, dropout)
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar is no news on stderr, where errors go
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
    except pickle.UnpicklingError as e:
        # transformers reads pytorch_model.bin with weights_only=True; its message advises False
        from gpt_trainer.checkpoint import refused_object
        found, reason = refused_object(e)
        if not found:
            raise HFError(f"{name_or_dir}: the weights file cannot be read ({reason}); it is truncated or "
                          f"corrupt, download it again")
        raise HFError(f"{name_or_dir}: the weights file holds Python objects other than tensors, so it was "
                      f"not loaded (it could run code); ask for a safetensors copy")
    except (OSError, ValueError, RuntimeError) as e:
        raise HFError(f"cannot load the weights of {name_or_dir!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model = GPT(config)
    try:
        model.load_state_dict(convert_state_dict(hf_model.state_dict()))
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        raise HFError(f"{name_or_dir}: weights do not fit its config.json ({reason})")
    return model


# -----------------------------------------------------------------------------
# Llama and Qwen3: config.json through transformers' config classes, weights read from the
# safetensors files directly (no second copy of the model)

def rope_parameters(hf_config):
    """{'rope_theta', 'rope_type', ...}: transformers 5's rope_parameters, or 4's rope_theta
    and rope_scaling."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = {"rope_theta": hf_config.rope_theta, **(getattr(hf_config, "rope_scaling", None) or {})}
    return params


def check_llama_config(c, source):
    """Refuse what our GPT does not compute, naming the config.json key."""
    rope = rope_parameters(c)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise HFError(f"{source}: rope_scaling of type {kind!r} is not supported; only plain RoPE "
                      f"(rope_scaling=null)")
    if "rope_theta" not in rope or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"{source}: rope_parameters={rope!r} is not supported; only one rope_theta "
                      f"applied to whole heads")
    if c.hidden_act != "silu":
        raise HFError(f"{source}: hidden_act={c.hidden_act!r} is not supported; only 'silu' (SwiGLU)")
    if getattr(c, "use_sliding_window", False):
        raise HFError(f"{source}: use_sliding_window=True (sliding-window attention) is not supported")
    layer_types = set(getattr(c, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise HFError(f"{source}: layer_types={sorted(layer_types)} is not supported; only full_attention")
    # Llama's attention_bias puts biases on q, k, v and o, mlp_bias on the MLP: our bias=True is
    # both; Qwen3 has no MLP bias, so its attention_bias cannot be expressed
    mlp_bias = getattr(c, "mlp_bias", False)
    if c.attention_bias != mlp_bias:
        raise HFError(f"{source}: attention_bias={c.attention_bias} with mlp_bias={mlp_bias} is not "
                      f"supported; only both false (or, for Llama, both true)")


def llama_config(c, source, dropout=None):
    """GPTConfig for an HF LlamaConfig or Qwen3Config. Defaults stand for HF's implied values
    (n_kv_head=0 when it equals n_head, head_dim=0 when n_embd // n_head)."""
    check_llama_config(c, source)
    n_embd, n_head = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or n_embd // n_head
    n_kv_head = c.num_key_value_heads or n_head
    try:
        return GPTConfig(block_size=c.max_position_embeddings, vocab_size=c.vocab_size,
                         n_layer=c.num_hidden_layers, n_head=n_head, n_embd=n_embd,
                         n_kv_head=0 if n_kv_head == n_head else n_kv_head,
                         head_dim=0 if head_dim * n_head == n_embd else head_dim,
                         dropout=0.0 if dropout is None else dropout, bias=c.attention_bias,
                         pos_emb="rope", rope_theta=float(rope_parameters(c)["rope_theta"]),
                         norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp="swiglu",
                         mlp_hidden=c.intermediate_size, qk_norm=c.model_type == "qwen3",
                         tie_embeddings=bool(c.tie_word_embeddings))
    except ValueError as e:
        raise HFError(f"{source}: {e}")


def read_safetensors(hf_dir):
    """{name: tensor} from model.safetensors, or from every shard model.safetensors.index.json lists."""
    from safetensors.torch import load_file
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise HFError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json; only safetensors "
                      f"weights are read (save_pretrained writes them)")
    tensors = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            raise HFError(f"{path} not found, but model.safetensors.index.json lists it")
        try:
            tensors.update(load_file(path))
        except Exception as e:  # safetensors' SafetensorError: a truncated or foreign file
            raise HFError(f"{path} cannot be read as safetensors ({last_line(e)}); it is truncated or "
                          f"corrupt: save or download it again")
    for name, t in tensors.items():
        if not t.is_floating_point():  # an int tensor would be cast to float in silence
            raise HFError(f"{hf_dir}: weight {name} is {t.dtype}, not a floating-point tensor; it is not "
                          f"a weight of a model this loader knows")
    return tensors


def llama_names(our_names, tied):
    """{our name: HF names stacked into it}; a tied lm_head is wte's weight, stored once by HF."""
    out = {}
    for name in our_names:
        if name in LLAMA_TOP:
            if not (tied and name == "lm_head.weight"):
                out[name] = (LLAMA_TOP[name],)
            continue
        _, _, i, suffix = name.split(".", 3)  # transformer.h.{i}.{suffix}
        out[name] = tuple(f"model.layers.{i}.{n}" for n in LLAMA_LAYER[suffix])
    return out


def load_llama_weights(model, tensors, source):
    state = {}
    for ours, theirs in llama_names(model.state_dict(), model.config.tie_embeddings).items():
        missing = [n for n in theirs if n not in tensors]
        if missing:
            raise HFError(f"{source}: the weights have no {missing[0]}, which its config.json implies")
        state[ours] = torch.cat([tensors.pop(n) for n in theirs])
    if model.config.tie_embeddings:
        head = tensors.pop("lm_head.weight", None)  # some savers store the tied head too
        if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
            raise HFError(f"{source}: tie_word_embeddings=true but lm_head.weight differs from "
                          f"model.embed_tokens.weight")
        state["lm_head.weight"] = state["transformer.wte.weight"]
    unused = sorted(n for n in tensors if not n.endswith("rotary_emb.inv_freq"))  # a buffer of old saves
    if unused:
        raise HFError(f"{source}: weight {unused[0]} has no place in the model its config.json describes")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        raise HFError(f"{source}: weights do not fit its config.json ({reason})")


def llama_from_hf(hf_dir, dropout=None):
    from transformers import AutoConfig
    try:
        hf_config = AutoConfig.from_pretrained(hf_dir)
    except Exception as e:  # OSError, ValueError, transformers' strict validation of the values
        raise HFError(f"{hf_dir}: transformers cannot read its config.json ({last_line(e)})")
    config = llama_config(hf_config, hf_dir, dropout)
    tensors = read_safetensors(hf_dir)
    model = GPT(config)
    load_llama_weights(model, tensors, hf_dir)
    return model


def hf_tokenizer(name_or_dir):
    """The tokenizer of what gpt_from_hf loads (weights_tokenizer's), else GPT-2's (tiktoken)."""
    from gpt_trainer.tokenizer import get_tokenizer
    return weights_tokenizer(name_or_dir) or get_tokenizer("gpt2")


def weights_tokenizer(name_or_dir):
    """The tokenizer the weights of gpt_from_hf(name_or_dir) were trained with: GPT-2's for
    gpt2*, the directory's tokenizer.json, or the characters in the meta.json export.py writes
    for a char-level checkpoint; None for a directory with neither."""
    from gpt_trainer.dataloader import load_meta
    from gpt_trainer.tokenizer import char_tokenizer_of, get_tokenizer
    if not os.path.isdir(name_or_dir):
        return get_tokenizer("gpt2")
    if os.path.exists(os.path.join(name_or_dir, "tokenizer.json")):
        return get_tokenizer(f"hf:{name_or_dir}")
    if load_meta(name_or_dir).get("encoding") == "char":
        return char_tokenizer_of(name_or_dir)
    return None


def check_start_tokenizer(init_from, meta, data_tok, data_dir, quiet=False):
    """Pretrained weights fine-tuned on data encoded with another tokenizer learn ids that
    stand for other text, and nothing fails: refuse the start unless every id of the data's
    tokenizer (data_tok, the one meta names) stands for the same bytes in the weights'
    (tokenizer.other_id). Weights of no known tokenizer are not checked, nor data whose
    tokenizer could not be loaded here (data_tok None: tiktoken's cache offline), with a note."""
    from gpt_trainer.errors import DataError
    from gpt_trainer.tokenizer import other_id
    if not os.path.isdir(init_from) and meta.get("encoding", "gpt2") == "gpt2":
        return  # GPT-2's weights on GPT-2 BPE data
    weights_tok, why_not = None, None
    if data_tok is None:
        why_not = "its tokenizer could not be loaded"
    else:
        try:
            weights_tok = weights_tokenizer(init_from)
        except DataError as e:
            why_not = str(e)
    if why_not:
        if not quiet:
            print(f"note: {data_dir}'s tokenizer was not compared with {init_from}'s ({why_not})", file=sys.stderr)
        return
    why = weights_tok and other_id(weights_tok, data_tok)
    if why:
        use = ("gpt2" if not os.path.isdir(init_from) else
               f"char:{init_from}" if weights_tok.name == "char" else f"hf:{init_from}")
        raise HFError(f"{data_dir}'s tokenizer ({data_tok.name}, {data_tok.vocab_size:,} tokens) is not the one "
                      f"{init_from} was trained with ({weights_tok.name}, {weights_tok.vocab_size:,} tokens): "
                      f"{why}; prepare the data with --encoding={use} (data/text/prepare.py, or "
                      f"data/chat/prepare.py for conversations)")


# -----------------------------------------------------------------------------
# ours -> HF: learned positions go to GPT-2, RoPE to Llama (Qwen3 with qk_norm)

def check_exportable(config, source):
    """Refuse the GPTConfig options the target (GPT-2, or Llama/Qwen3 for pos_emb='rope')
    cannot express, naming the first one."""
    if config.pos_emb == "rope":
        target = "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"
        need = {"norm": ["rmsnorm"], "mlp": ["swiglu"], "logit_softcap": [0.0]}
        if config.qk_norm:
            need["bias"] = [False]  # Qwen3's MLP has no bias
        where = f"a pos_emb='rope' model is exported as HF {target}"
    else:
        gpt2 = GPTConfig(block_size=config.block_size, vocab_size=config.vocab_size, n_layer=config.n_layer,
                         n_head=config.n_head, n_embd=config.n_embd)
        # bias=False is exported with zero biases (export_gpt2): the same function
        need = {key: [getattr(gpt2, key)] for key in ("norm", "qk_norm", "tie_embeddings", "logit_softcap",
                                                      "head_dim")}
        need["mlp"] = sorted(set(HF_ACTIVATIONS.values()))
        need["n_kv_head"] = [0, config.n_head]  # grouped-query attention
        where = "a pos_emb='learned' model is exported as HF GPT2LMHeadModel"
    for key, allowed in need.items():
        if getattr(config, key) not in allowed:
            raise HFError(f"{source}: {key}={getattr(config, key)!r} cannot be exported: {where}, "
                          f"which needs {key}={' or '.join(map(repr, allowed))}")


def gpt2_hf_config(config):
    from transformers import GPT2Config
    # GPT-2's <|endoftext|> only exists in a vocabulary that reaches it
    eot = GPT2_EOT if config.vocab_size > GPT2_EOT else None
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, n_inner=config.mlp_hidden or None,
                      activation_function=next(k for k, v in HF_ACTIVATIONS.items() if v == config.mlp),
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                      layer_norm_epsilon=config.norm_eps, bos_token_id=eot, eos_token_id=eot,
                      architectures=["GPT2LMHeadModel"])


def llama_hf_config(model, special_ids):
    """LlamaConfig, or Qwen3Config with qk_norm; special_ids: bos/eos_token_id of the tokenizer."""
    from transformers import LlamaConfig, Qwen3Config
    c = model.config
    cls, arch = (Qwen3Config, "Qwen3ForCausalLM") if c.qk_norm else (LlamaConfig, "LlamaForCausalLM")
    extra = {} if c.qk_norm else {"mlp_bias": c.bias}
    return cls(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
               intermediate_size=model.transformer.h[0].mlp.c_proj.in_features,
               num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, head_dim=c.head_size,
               max_position_embeddings=c.block_size, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
               tie_word_embeddings=c.tie_embeddings, hidden_act="silu", attention_bias=c.bias,
               architectures=[arch], **extra, **special_ids)


def llama_state_dict(model):
    """HF Llama/Qwen3 tensors of our model: fused weights split back, each its own storage."""
    c, sd = model.config, model.state_dict()
    qkv = [c.n_head * c.head_size, c.kv_heads * c.head_size, c.kv_heads * c.head_size]
    out = {}
    for ours, theirs in llama_names(sd, c.tie_embeddings).items():
        sizes = qkv if ".attn.c_attn." in ours else [sd[ours].size(0) // len(theirs)] * len(theirs)
        for name, t in zip(theirs, sd[ours].split(sizes)):
            out[name] = t.detach().clone()
    return out


def read_gpt2_tokenizer_files():
    """(vocab.json, merges.txt) bytes: the files tiktoken's gpt2 encoding is built from."""
    from tiktoken.load import read_file_cached
    try:
        return read_file_cached(GPT2_ENCODER_URL), read_file_cached(GPT2_MERGES_URL)
    except Exception as e:
        raise HFError(f"cannot read GPT-2's tokenizer files ({type(e).__name__}); go online once or "
                      f"set TIKTOKEN_CACHE_DIR to a cache holding them")


def save_gpt2_tokenizer(out_dir, vocab_bytes, merges_bytes, block_size):
    """vocab.json + merges.txt, and the tokenizer.json / tokenizer_config.json that
    AutoTokenizer.from_pretrained(out_dir) reads."""
    from transformers import GPT2Tokenizer
    with open(os.path.join(out_dir, "vocab.json"), "wb") as f:
        f.write(vocab_bytes)
    with open(os.path.join(out_dir, "merges.txt"), "wb") as f:
        f.write(merges_bytes)
    # merges.txt: a '#version' line, then one 'left right' merge per line
    merges = [tuple(line.split()) for line in merges_bytes.decode().split("\n")[1:] if line]
    tok = GPT2Tokenizer(vocab=json.loads(vocab_bytes), merges=merges, model_max_length=block_size)
    tok.save_pretrained(out_dir)


def checkpoint_tokenizer_files(meta):
    """(tokenizer.json text, tokenizer_config dict) of a checkpoint trained on data encoded with
    an HF tokenizer (hf:DIR) or a bpe:N one, as train.py embeds them; else None."""
    if meta.get("encoding") not in ("hf", "bpe") or not meta.get("tokenizer_json"):
        return None
    config = meta.get("tokenizer_config")
    if not config:  # our bpe: its end-of-text token is the only special one
        from gpt_trainer.tokenizer import EOT
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT}
    return meta["tokenizer_json"], config


def special_token_ids(tokenizer_files):
    """bos_token_id / eos_token_id for config.json, from the tokenizer's special tokens."""
    if tokenizer_files is None:
        return {"bos_token_id": None, "eos_token_id": None}
    from tokenizers import Tokenizer
    tok, config = Tokenizer.from_str(tokenizer_files[0]), tokenizer_files[1]
    ids = {}
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        ids[f"{key}_id"] = tok.token_to_id(token) if token else None
    return ids


def export_model(model, out_dir, tokenizer=None, source="model"):
    """Write `model` as an HF directory: config.json + model.safetensors (+ tokenizer files).
    tokenizer: None, 'gpt2' (tiktoken's GPT-2 files) or (tokenizer.json text, tokenizer_config).
    Everything that can fail is checked before the first file is written."""
    check_exportable(model.config, source)
    if model.config.pos_emb == "rope":
        hf_config = llama_hf_config(model, special_token_ids(None if tokenizer == "gpt2" else tokenizer))
        tensors = llama_state_dict(model)
        os.makedirs(out_dir, exist_ok=True)
        from safetensors.torch import save_file
        hf_config.save_pretrained(out_dir)
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        export_gpt2(model, out_dir, source)
    if tokenizer == "gpt2":
        save_gpt2_tokenizer(out_dir, *read_gpt2_tokenizer_files(), model.config.block_size)
    elif tokenizer is not None:
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            f.write(tokenizer[0])
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer[1], f, indent=2)


def export_gpt2(model, out_dir, source):
    from transformers import GPT2LMHeadModel
    hf_model = GPT2LMHeadModel(gpt2_hf_config(model.config))
    tensors = convert_state_dict(model.state_dict())
    if not model.config.bias:  # GPT-2 always has biases: zeros compute the same function
        for name, t in hf_model.state_dict().items():
            if name.endswith(".bias") and not name.endswith(HF_BUFFERS) and name not in tensors:
                tensors[name] = torch.zeros_like(t)
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith(HF_BUFFERS)]
    if missing or unexpected:
        raise HFError(f"{source}: weights do not map onto HF GPT-2 (missing {missing}, "
                      f"unexpected {unexpected})")
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir)  # safetensors, with the tied head stored once
