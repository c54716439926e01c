"""
Export a checkpoint as a Hugging Face transformers directory (GPT-2, Llama or Qwen3, by its
options), or write an FSDP run's sharded checkpoint as one ckpt.pt:

    python export.py --ckpt=out/ckpt.pt --out=out/hf      # -> config.json, model.safetensors, tokenizer
    python export.py --consolidate=out                    # out/ckpt_dcp/ -> out/ckpt.pt
"""
import json
import os
import sys
from dataclasses import asdict

from configurator import ArgumentParser, install_error_hook
from gpt_trainer import lora
from gpt_trainer.chat_template import DEFAULT_JINJA, SPECIALS
from gpt_trainer.checkpoint import consolidate, load_checkpoint
from gpt_trainer.errors import HFError
from gpt_trainer.hf import checkpoint_tokenizer_files, export_model, read_gpt2_tokenizer_files
from gpt_trainer.loading import build_any_model
from model import GPT, GPTConfig


def export_hf(ckpt_path, out_dir, adapter_dir=None):
    """Export one of our checkpoints with its tokenizer: the HF or bpe tokenizer its data was
    encoded with, or GPT-2's files when its data was GPT-2 BPE, and the chat template of chat
    data. A LoRA checkpoint is merged; with adapter_dir its adapter is also written there for
    peft, with the unmerged base as an HF model in adapter_dir/base. Returns (model, what
    tokenizer was written: 'hf', 'bpe', 'gpt2' or None)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HFError(f"--out={out_dir} is a file, not a directory; pick another --out")
    ckpt = load_checkpoint(ckpt_path)
    model = build_any_model(ckpt, ckpt_path)
    if adapter_dir and not hasattr(model, "lora"):
        raise HFError(f"{ckpt_path} was not trained with LoRA (lora_rank=0): it has no adapter to export")
    meta = ckpt.get("meta") or {}
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
        lora.export_adapter(model, adapter_dir, os.path.join(adapter_dir, "base"))
    if hasattr(model, "lora"):
        lora.merge(model)
    export_model(model, out_dir, tokenizer, source=ckpt_path)
    export_chat_template(out_dir, meta, tokenizer)
    return model, kind if tokenizer else None


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


def main(argv):
    parser = ArgumentParser(description="Export a checkpoint as a Hugging Face directory (GPT-2, "
                                        "Llama or Qwen3, by its architecture), or consolidate a "
                                        "sharded (FSDP) checkpoint into one ckpt.pt.")
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint to export")
    parser.add_argument("--out", default=None, help="directory to write (config.json, model.safetensors); "
                                                    "default out/hf; with --consolidate: the ckpt.pt to "
                                                    "write, default OUT_DIR/ckpt.pt")
    parser.add_argument("--consolidate", default="", metavar="OUT_DIR",
                        help="write OUT_DIR/ckpt_dcp/ (an FSDP run's sharded checkpoint) as one ckpt.pt "
                             "(weights, no optimizer) for sample.py, evaluate.py and export")
    parser.add_argument("--adapter", default=None, help="LoRA checkpoints: also write the peft adapter here "
                                                         "(and the unmerged base model in ADAPTER/base)")
    args = parser.parse_args(argv)
    if args.consolidate:
        print(f"wrote {consolidate(args.consolidate, args.out)}")
        return
    out = args.out or "out/hf"
    model, tokenizer = export_hf(args.ckpt, out, args.adapter)
    n = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    print(f"wrote {out}: {arch}, {n / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
          f"{f'its {tokenizer} tokenizer' if tokenizer else 'no tokenizer (its data has no HF or GPT-2 one)'}; "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({out!r})")


if __name__ == "__main__":
    install_error_hook()
    main(sys.argv[1:])
