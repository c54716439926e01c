"""
Hugging Face GPT-2 <-> our GPT, both directions through one name map.

Our parameter names are HF GPT2LMHeadModel's, so the only difference is that HF's Conv1D
layers (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) store weights as (in, out), the
transpose of nn.Linear's (out, in).

    model = gpt_from_hf("gpt2")          # or gpt2-medium/-large/-xl, or a save_pretrained dir
    python hf.py --ckpt=out/ckpt.pt --out=out/hf   # a checkpoint -> a transformers directory
"""
import json
import os
import sys

from checkpoint import build_model, load_checkpoint
from configurator import ArgumentParser, UserError, install_error_hook
from model import GPT, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# HF activation_function -> our mlp; gelu_pytorch_tanh is the same tanh GELU as gelu_new
HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers
# the files tiktoken's own gpt2 encoding reads; they are GPT-2's vocab.json and merges.txt
GPT2_ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_MERGES_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_EOT = 50256


class HFError(UserError):
    """A model that cannot move between HF GPT-2 and our GPT: reported to the user as one line."""


def convert_state_dict(state_dict):
    """Our state dict <-> HF GPT-2's (the map is its own inverse): same names, Conv1D weights
    transposed, HF's mask buffers dropped."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith(HF_BUFFERS):
            continue
        out[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    return out


def check_hf_overrides(overrides):
    """GPT-2 weights fix the architecture: of the GPTConfig fields only dropout may be set."""
    for key in overrides:
        if key in GPTConfig.field_names() and key != "dropout":
            raise HFError(f"{key} cannot be overridden when initialising from GPT-2 weights "
                          f"(only dropout can); drop --{key}")


# -----------------------------------------------------------------------------
# HF -> ours

def config_from_hf(hf_config, source, dropout=None):
    """GPTConfig for an HF GPT2Config, refusing the variants our GPT does not compute."""
    mlp = HF_ACTIVATIONS.get(hf_config.activation_function)
    if mlp is None:
        raise HFError(f"{source}: activation_function={hf_config.activation_function!r} is not "
                      f"supported; only {', '.join(map(repr, HF_ACTIVATIONS))}")
    required = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "tie_word_embeddings": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "add_cross_attention": False}
    for key, want in required.items():
        got = getattr(hf_config, key, want)
        if got != want:
            raise HFError(f"{source}: {key}={got!r} is not supported; only {key}={want!r} (GPT-2's)")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        raise HFError(f"{source}: n_inner={hf_config.n_inner} is not supported; only 4 * n_embd")
    try:
        return GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                         n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                         dropout=0.0 if dropout is None else dropout, bias=True, mlp=mlp)
    except ValueError as e:
        raise HFError(f"{source}: {e}")


def load_hf_config(name_or_dir):
    from transformers import GPT2Config
    if os.path.isdir(name_or_dir):
        path = os.path.join(name_or_dir, "config.json")
        if not os.path.exists(path):
            raise HFError(f"{path} not found; expected a directory written by save_pretrained")
        try:
            with open(path) as f:
                model_type = json.load(f).get("model_type")
        except ValueError as e:
            raise HFError(f"{path}: not valid JSON ({e})")
        if model_type != "gpt2":
            raise HFError(f"{path}: model_type={model_type!r}, only 'gpt2' models can be loaded")
    elif name_or_dir not in GPT2_NAMES:
        raise HFError(f"{name_or_dir!r} is neither one of {', '.join(GPT2_NAMES)} nor a directory")
    try:
        return GPT2Config.from_pretrained(name_or_dir)
    except OSError as e:
        raise HFError(f"cannot load {name_or_dir!r} from the Hugging Face hub ({str(e).splitlines()[0]}); "
                      f"go online once (it is cached afterwards) or pass a local directory")


def gpt_from_hf(name_or_dir, dropout=None):
    """Our GPT with the weights of GPT-2 (a hub name, downloaded by transformers) or of a local
    HF GPT-2 directory. vocab_size is HF's (50257 for OpenAI's GPT-2)."""
    from transformers import GPT2LMHeadModel
    config = config_from_hf(load_hf_config(name_or_dir), name_or_dir, dropout)
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
    except OSError as e:
        raise HFError(f"cannot load the weights of {name_or_dir!r} ({str(e).splitlines()[0]})")
    model = GPT(config)
    try:
        model.load_state_dict(convert_state_dict(hf_model.state_dict()))
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        raise HFError(f"{name_or_dir}: weights do not fit its config.json ({reason})")
    return model


# -----------------------------------------------------------------------------
# ours -> HF

def check_exportable(config, source):
    """Refuse the GPTConfig options HF's GPT-2 cannot express, naming the first one."""
    gpt2 = GPTConfig(block_size=config.block_size, vocab_size=config.vocab_size, n_layer=config.n_layer,
                     n_head=config.n_head, n_embd=config.n_embd)
    for key in ("pos_emb", "norm", "mlp", "qk_norm", "tie_embeddings", "bias", "logit_softcap"):
        allowed = sorted(set(HF_ACTIVATIONS.values())) if key == "mlp" else [getattr(gpt2, key)]
        if getattr(config, key) not in allowed:
            raise HFError(f"{source}: {key}={getattr(config, key)!r} cannot be exported to HF GPT-2, "
                          f"which needs {key}={' or '.join(map(repr, allowed))}")
    if config.n_kv_head not in (0, config.n_head):
        raise HFError(f"{source}: n_kv_head={config.n_kv_head} (grouped-query attention) cannot be "
                      f"exported to HF GPT-2, which needs n_kv_head=0")


def hf_config_for(config):
    from transformers import GPT2Config
    # GPT-2's <|endoftext|> only exists in a vocabulary that reaches it
    eot = GPT2_EOT if config.vocab_size > GPT2_EOT else None
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head,
                      activation_function=next(k for k, v in HF_ACTIVATIONS.items() if v == config.mlp),
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                      layer_norm_epsilon=1e-5, bos_token_id=eot, eos_token_id=eot,
                      architectures=["GPT2LMHeadModel"])


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


def export_model(model, out_dir, gpt2_tokenizer=False, source="model"):
    """Write `model` as an HF GPT-2 directory: config.json + model.safetensors (+ tokenizer).
    Everything that can fail is checked before the first file is written."""
    from transformers import GPT2LMHeadModel
    check_exportable(model.config, source)
    tokenizer_files = read_gpt2_tokenizer_files() if gpt2_tokenizer else None
    hf_model = GPT2LMHeadModel(hf_config_for(model.config))
    missing, unexpected = hf_model.load_state_dict(convert_state_dict(model.state_dict()), strict=False)
    missing = [k for k in missing if not k.endswith(HF_BUFFERS)]
    if missing or unexpected:
        raise HFError(f"{source}: weights do not map onto HF GPT-2 (missing {missing}, "
                      f"unexpected {unexpected})")
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir)  # safetensors, with the tied head stored once
    if tokenizer_files:
        save_gpt2_tokenizer(out_dir, *tokenizer_files, model.config.block_size)


def export_hf(ckpt_path, out_dir):
    """Export one of our checkpoints; GPT-2 tokenizer files too when its data was GPT-2 BPE.
    Returns (model, whether the tokenizer was written)."""
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt, ckpt_path)
    meta = ckpt.get("meta") or {}
    from_gpt2 = str((ckpt.get("config") or {}).get("init_from", "")).startswith("gpt2")
    with_tokenizer = meta.get("encoding") == "gpt2" or from_gpt2
    export_model(model, out_dir, gpt2_tokenizer=with_tokenizer, source=ckpt_path)
    return model, with_tokenizer


def main(argv):
    parser = ArgumentParser(description="Export a checkpoint as a Hugging Face GPT-2 directory.")
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint to export")
    parser.add_argument("--out", default="out/hf", help="directory to write (config.json, model.safetensors)")
    args = parser.parse_args(argv)
    model, with_tokenizer = export_hf(args.ckpt, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
          f"{'GPT-2 tokenizer' if with_tokenizer else 'no tokenizer (its data is not GPT-2 BPE)'}; "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({args.out!r})")


if __name__ == "__main__":
    install_error_hook()
    main(sys.argv[1:])
