"""
Export a checkpoint as a Hugging Face transformers directory (GPT-2, Llama or Qwen3, by its
options), or write an FSDP run's sharded checkpoint as one ckpt.pt:

    python export.py --ckpt=out/ckpt.pt --out=out/hf      # -> config.json, model.safetensors, tokenizer
    python export.py --consolidate=out                    # out/ckpt_dcp/ -> out/ckpt.pt

Settings are set like train.py's: a config file, then --key=value overrides; --help lists them.
"""
import json
import os
import sys
from dataclasses import asdict

# -----------------------------------------------------------------------------
# settings
ckpt = "out/ckpt.pt"  # the checkpoint to export
out = ""  # the directory to write ('' = out/hf); with consolidate, the ckpt.pt to write ('' = OUT_DIR/ckpt.pt)
consolidate = ""  # an FSDP run's out_dir: write its sharded ckpt_dcp/ as one ckpt.pt (weights, no optimizer)
adapter = ""  # LoRA checkpoints: also write the peft adapter here (and the unmerged base model in ADAPTER/base)
# -----------------------------------------------------------------------------
SETTINGS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

from configurator import configure, install_error_hook  # noqa: E402
from gpt_trainer import checkpoint, lora  # noqa: E402
from gpt_trainer.chat_template import DEFAULT_JINJA, SPECIALS  # noqa: E402
from gpt_trainer.errors import HFError  # noqa: E402
from gpt_trainer.hf import checkpoint_tokenizer_files, export_model, read_gpt2_tokenizer_files  # noqa: E402
from gpt_trainer.loading import build_any_model, checkpoint_meta  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def export_hf(ckpt_path, out_dir, adapter_dir=None):
    """Export one of our checkpoints with its tokenizer: the HF or bpe tokenizer its data was
    encoded with, or GPT-2's files when its data was GPT-2 BPE, and the chat template of chat
    data. A LoRA checkpoint is merged; with adapter_dir its adapter is also written there for
    peft, with the unmerged base as an HF model in adapter_dir/base. Returns (model, what
    tokenizer was written: 'hf', 'bpe', 'gpt2' or None)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HFError(f"--out={out_dir} is a file, not a directory; pick another --out")
    ckpt = checkpoint.load_checkpoint(ckpt_path)
    model = build_any_model(ckpt, ckpt_path)
    if adapter_dir and not hasattr(model, "lora"):
        raise HFError(f"{ckpt_path} was not trained with LoRA (lora_rank=0): it has no adapter to export")
    meta = checkpoint_meta(ckpt)[0]  # a nanoGPT checkpoint's from its data dir (data/<dataset>/meta.pkl)
    tokenizer, kind = checkpoint_tokenizer_files(meta), meta.get("encoding")
    from_gpt2 = str((ckpt.get("config") or {}).get("init_from", "")).startswith("gpt2")
    if tokenizer is None and (kind == "gpt2" or from_gpt2):
        tokenizer, kind = "gpt2", "gpt2"
    if tokenizer == "gpt2":
        read_gpt2_tokenizer_files()  # fail before writing anything
    if adapter_dir:
        base = GPT(GPTConfig(**asdict(model.config)))
        base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))})
        export_model(base, os.path.join(adapter_dir, "base"), tokenizer, source=ckpt_path)
        export_chat_template(os.path.join(adapter_dir, "base"), meta, tokenizer)
        export_chars(os.path.join(adapter_dir, "base"), meta)
        lora.export_adapter(model, adapter_dir, os.path.join(adapter_dir, "base"))
    if hasattr(model, "lora"):
        lora.merge(model)
    export_model(model, out_dir, tokenizer, source=ckpt_path)
    export_chat_template(out_dir, meta, tokenizer)
    wrote_chars = export_chars(out_dir, meta)
    return model, kind if tokenizer or wrote_chars else None


def export_chars(out_dir, meta):
    """A char-level checkpoint's characters, as meta.json (a char data dir's layout): HF has no
    tokenizer for them, and without them the dir's ids mean nothing. train.py checks data for a
    fine-tune against them, sample.py decodes with them, prepare.py --encoding=char:OUT_DIR
    encodes new data with them, and chat.py --hf=OUT_DIR takes the chat template beside them.
    Returns whether it wrote them."""
    if meta.get("encoding") != "char" or "chars" not in meta:
        return False
    from gpt_trainer.tokenizer import CharTokenizer
    tok = CharTokenizer(meta["chars"])
    chat = {"chat": meta["chat"]} if meta.get("chat") else {}  # chat.py --hf=OUT_DIR talks with its template
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({**tok.meta(), "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint(), **chat},
                  f, ensure_ascii=False)
    return True


def export_chat_template(out_dir, meta, tokenizer):
    """Give the exported tokenizer the chat template of the checkpoint's chat data: an HF
    template as it was, our default one with its special tokens added (GPT-2 and bpe: they
    take the ids after the vocabulary, the ids training used)."""
    chat = meta.get("chat")
    if not chat or tokenizer is None:
        return
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out_dir)
    if chat["template"] == "hf":
        tok.chat_template = chat["chat_template"]
    else:
        tok.add_special_tokens({"additional_special_tokens": SPECIALS})
        ids = tok.convert_tokens_to_ids(SPECIALS)
        if ids != [chat["special_tokens"][s] for s in SPECIALS]:
            raise HFError(f"the exported tokenizer gives the chat template's tokens ids {ids}, training used "
                          f"{list(chat['special_tokens'].values())}")
        tok.chat_template = DEFAULT_JINJA
    tok.save_pretrained(out_dir)


TOKENIZER_NOTE = {None: "no tokenizer (its data has no HF or GPT-2 one)",
                  "char": "its characters in meta.json (for sample.py, train.py, chat.py and prepare.py "
                          "--encoding=char:DIR; transformers has no char tokenizer)"}


def main(argv):
    s = configure({k: globals()[k] for k in SETTINGS}, argv, __file__)
    if s["consolidate"]:
        print(f"wrote {checkpoint.consolidate(s['consolidate'], s['out'] or None)}")
        return
    out = s["out"] or "out/hf"
    model, tokenizer = export_hf(s["ckpt"], out, s["adapter"] or None)
    n = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    print(f"wrote {out}: {arch}, {n / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
          f"{TOKENIZER_NOTE.get(tokenizer, f'its {tokenizer} tokenizer')}; "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({out!r})")


if __name__ == "__main__":
    install_error_hook()
    main(sys.argv[1:])
