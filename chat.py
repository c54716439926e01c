"""
Talk to a fine-tuned model in the terminal (docs/chat.md):

    python chat.py --out_dir=out-chat                 # a checkpoint trained on a chat data dir
    python chat.py --hf=path/to/Qwen3-0.6B            # a Hugging Face model with a chat_template
    python chat.py --out_dir=out-chat --prompt="reverse abc"   # one turn, the reply on stdout

Each reply streams as it is generated and ends at the template's end-of-turn token. The KV
cache is kept across turns: a new turn feeds only the tokens the cache does not hold yet (the
conversation as the template renders it, after the longest prefix already cached). Lines
/reset (a new conversation) and /quit are commands; Ctrl-D ends.
"""
import sys

import torch

from configurator import configure, install_error_hook
from gpt_trainer.chat_template import ChatError, HFChat, chat_from_meta, hf_tokenizer_from_dir
from gpt_trainer.checkpoint import inference_path, load_checkpoint
from gpt_trainer.dataloader import load_meta
from gpt_trainer.loading import build_any_model
from gpt_trainer.cpu_kernels import decoding
from gpt_trainer.generate import decode, decode_params, sample_next
from gpt_trainer.kv_cache import KVCache
from gpt_trainer.runtime import autocast_context, resolve_device, resolve_dtype

# -----------------------------------------------------------------------------
out_dir = "out"  # the checkpoint's directory (ignored with hf)
ckpt = "auto"  # 'auto' = out_dir/best.pt if it exists, else out_dir/ckpt.pt; or a path
hf = ""  # a Hugging Face model directory (GPT-2, Llama or Qwen3) with a chat_template, instead of out_dir
prompt = ""  # one user turn: print the reply and exit; '' = an interactive conversation
system = ""  # a system message that starts the conversation; '' = none
max_new_tokens = 256  # tokens per reply at most
temperature = 0.0  # 0 = greedy (the same reply every time); > 0 samples
top_k = 0  # sample among the k most likely tokens only; 0 = no limit
top_p = 1.0  # nucleus sampling; 1.0 = off
seed = 1337
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
SETTINGS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def load(out_dir, ckpt="auto", hf=""):
    """(model, chat template, source) from an HF dir or one of our checkpoints."""
    if hf:
        from gpt_trainer.hf import gpt_from_hf
        meta = load_meta(hf)  # a char-level model's characters and template, as export.py writes them
        if meta.get("encoding") == "char":
            chat = chat_from_meta(meta, hf, source=hf)
        else:
            chat = HFChat(hf_tokenizer_from_dir(hf), hf)  # a ChatError before the weights are read
        return gpt_from_hf(hf), chat, hf
    ckpt = inference_path(out_dir, ckpt)
    checkpoint = load_checkpoint(ckpt)
    chat = chat_from_meta(checkpoint.get("meta") or {}, source=ckpt)
    model = build_any_model(checkpoint, ckpt)
    if hasattr(model, "lora"):  # decode steps read plain weights: fold the adapters in
        from gpt_trainer.lora import merge
        merge(model)
    return model, chat, ckpt


class Conversation:
    """Messages so far and the KV cache of their tokens; reply() streams the assistant's turn."""

    def __init__(self, model, chat, system="", temperature=0.0, top_k=0, top_p=1.0, seed=1337):
        self.model, self.chat = model, chat
        self.system = [{"role": "system", "content": system}] if system else []
        self.sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p,
                             generator=torch.Generator(next(model.parameters()).device).manual_seed(seed))
        self.reset()

    def reset(self):
        self.messages = list(self.system)
        self.cache, self.cached = KVCache(self.model.config.n_layer), []  # token ids the cache holds

    def _prompt_ids(self):
        """The rendered conversation with the generation prompt; the oldest turns dropped (the
        system message kept) while it does not leave room in block_size for a reply."""
        bs = self.model.config.block_size
        while True:
            ids = self.chat.encode(self.messages, add_generation_prompt=True)[0]
            turns = len(self.messages) - len(self.system)
            if len(ids) < bs or turns <= 1:
                return ids[-(bs - 1):]
            self.messages = self.system + self.messages[len(self.system) + 2:]

    def _feed(self, ids):
        """Logits after ids, feeding only what follows the longest prefix already cached."""
        p = 0
        while p < min(len(ids) - 1, len(self.cached)) and ids[p] == self.cached[p]:
            p += 1  # at least the last token is fed: its logits are the next token's
        self.cache.pos, self.cached = p, ids[:p]
        device = next(self.model.parameters()).device
        logits, _ = self.model(torch.tensor([ids[p:]], device=device), kv_cache=self.cache)
        self.cached = list(ids)
        return logits[:, -1]

    @torch.inference_mode()
    def reply(self, user_text, max_new_tokens):
        """Yield the reply's ids one at a time; the end-of-turn token ends it (not yielded)."""
        self.messages.append({"role": "user", "content": user_text})
        ids, params, bs = self._prompt_ids(), decode_params(self.model), self.model.config.block_size
        out = []
        with decoding(self.model.lm_head.weight):
            logits = self._feed(ids)
            for _ in range(max_new_tokens):
                token = sample_next(logits[:, :self.chat.vocab_size], **self.sampling)
                t = int(token)
                if t in self.chat.end_ids:
                    break
                out.append(t)
                yield t
                if self.cache.pos >= bs:
                    break
                logits = decode(self.model, token.view(1, 1), self.cache, params)[:, -1]
                self.cached.append(t)
        self.messages.append({"role": "assistant", "content": self.chat.decode(out)})


def stream(conv, text, max_new_tokens, out=sys.stdout):
    """Print a reply as it arrives (a character split over tokens waits for its last one)."""
    ids, shown = [], 0
    for t in conv.reply(text, max_new_tokens):
        ids.append(t)
        text = conv.chat.decode(ids).rstrip("\ufffd")
        out.write(text[shown:])
        out.flush()
        shown = len(text)
    out.write(conv.chat.decode(ids)[shown:] + "\n")
    out.flush()
    return conv.messages[-1]["content"]


def interactive(conv, max_new_tokens):
    print("chat: /reset starts over, /quit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            conv.reset()
            continue
        if line.strip():
            stream(conv, line, max_new_tokens)


if __name__ == "__main__":
    install_error_hook()
    globals().update(configure({k: globals()[k] for k in SETTINGS}, sys.argv[1:], __file__))
    if temperature < 0 or max_new_tokens < 1:
        raise ChatError(f"temperature={temperature} must be >= 0 and max_new_tokens={max_new_tokens} >= 1")
    torch.manual_seed(seed)
    device = resolve_device(device)
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    model, chat, source = load(out_dir, ckpt, hf)
    model.eval().to(device)
    print(f"{source}: {model.get_num_params() / 1e6:.2f}M parameters, {chat.kind} chat template, {device}",
          file=sys.stderr)
    conv = Conversation(model, chat, system, temperature, top_k, top_p, seed)
    with autocast_context(device_type, resolve_dtype(dtype, device_type)):
        if prompt:
            stream(conv, prompt, max_new_tokens)
        else:
            interactive(conv, max_new_tokens)
