"""
nanoGPT's checkpoint format, both ways (karpathy/nanoGPT, its model.py and train.py).

nanoGPT saves `model_args` with exactly its GPTConfig's seven keys and rebuilds its model
with GPTConfig(**model_args): learned positions, LayerNorm (eps 1e-5), the exact (erf) GELU
of nn.GELU(), a 4 * n_embd MLP, full attention and a tied head. So:
- a checkpoint whose model_args has only those keys (and no `gpt_config`) was written by
  nanoGPT and is that model here: mlp='gelu_exact', never GPT-2's tanh GELU;
- our checkpoint of a model nanoGPT can express has model_args with exactly its keys, so its
  unmodified sample.py and train.py load it, and the full GPTConfig beside it in `gpt_config`;
- for any other model, model_args holds every GPTConfig field, so nanoGPT's
  GPTConfig(**model_args) refuses it (unexpected keyword argument) instead of loading its
  weights into a different model.
"""
from dataclasses import asdict


MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
ARCH = dict(pos_emb="learned", norm="layernorm", mlp="gelu_exact")  # nanoGPT's model.py


def written_by_nanogpt(ckpt):
    return "gpt_config" not in ckpt and set(ckpt["model_args"]) <= set(MODEL_ARGS)


def config_fields(ckpt):
    """The GPTConfig fields of a checkpoint: ours (gpt_config; model_args before it existed)
    or nanoGPT's (model_args plus its fixed architecture)."""
    if "gpt_config" in ckpt:
        return dict(ckpt["gpt_config"])
    if written_by_nanogpt(ckpt):
        return {**ckpt["model_args"], **ARCH}
    return dict(ckpt["model_args"])


def why_not(config):
    """'' when nanoGPT's model.py computes exactly this GPTConfig, else the first option it lacks."""
    c = config
    needs = [("pos_emb", c.pos_emb == "learned", "learned positions"),
             ("norm", c.norm == "layernorm", "LayerNorm"), ("norm_eps", c.norm_eps == 1e-5, "eps 1e-5"),
             ("mlp", c.mlp == "gelu_exact", "the exact GELU, mlp='gelu_exact'"),
             ("mlp_hidden", c.mlp_hidden in (0, 4 * c.n_embd), "a 4 * n_embd MLP"),
             ("n_kv_head", c.kv_heads == c.n_head, "full multi-head attention"),
             ("head_dim", c.head_size * c.n_head == c.n_embd, "head_dim = n_embd / n_head"),
             ("qk_norm", not c.qk_norm, "no QK-norm"), ("tie_embeddings", c.tie_embeddings, "a tied head"),
             ("logit_softcap", not c.logit_softcap, "no logit soft-cap")]
    for key, ok, what in needs:
        if not ok:
            return f"{key}={getattr(c, key)!r} (nanoGPT's model has only {what})"
    return ""


def checkpoint_fields(config):
    """What a checkpoint of a model with this GPTConfig stores: model_args (nanoGPT's keys when
    nanoGPT can express the model, else every field) and gpt_config (every field)."""
    full = asdict(config)
    args = {k: full[k] for k in MODEL_ARGS} if not why_not(config) else full
    return {"model_args": args, "gpt_config": full}


def param_order(names):
    """Parameter names in nanoGPT's named_parameters order: it registers wpe right after wte,
    this model after the blocks. Its train.py loads optimizer state by position, so the saved
    state is written in this order."""
    names = list(names)
    if "transformer.wpe.weight" in names and "transformer.wte.weight" in names:
        names.remove("transformer.wpe.weight")
        names.insert(names.index("transformer.wte.weight") + 1, "transformer.wpe.weight")
    return names
