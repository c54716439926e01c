"""
Chat templates: a conversation (a list of {'role', 'content'} messages) as token ids, with a
mask of the ids the assistant wrote (the loss targets of supervised fine-tuning).

Two kinds, recorded in a chat dataset's meta.json under 'chat' (and so in every checkpoint
trained on it):

  default  for our own tokenizers (char, gpt2 and other tiktoken encodings, bpe:N): four
           special ids appended after the tokenizer's vocabulary V,
               <|system|> = V, <|user|> = V + 1, <|assistant|> = V + 2, <|end|> = V + 3
           and each message rendered as  <|role|> content <|end|>  (no other text). A reply
           is prompted by <|assistant|> and ends at <|end|>. GPT-2's V = 50257, so the ids
           are 50257..50260, unused rows of the padded 50304 vocabulary; a char vocabulary
           grows by four ids. The assistant's tokens are its content and its <|end|>.
  hf       a Hugging Face tokenizer's own chat_template (hf:DIR), rendered by transformers'
           apply_chat_template, exactly as transformers renders it. The assistant's tokens
           come from the template's {% generation %} blocks where it has them, else from
           rendering each prefix of the conversation (the text that an assistant message adds
           after the generation prompt is its span).
"""
import json

import numpy as np

from gpt_trainer.dataloader import fingerprint
from gpt_trainer.errors import UserError

ROLES = ("system", "user", "assistant")
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# the default template as jinja, for an exported HF tokenizer that has these special tokens
DEFAULT_JINJA = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + "
                 "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


class ChatError(UserError):
    """A model or dataset without a usable chat template."""


class BadConversation(ValueError):
    """A record that is not a usable conversation (the reason is the message)."""


def check_messages(messages):
    """Raise BadConversation unless messages is a list of {'role', 'content': str} with a known
    role and at least one assistant message."""
    if not isinstance(messages, list) or not messages:
        raise BadConversation("no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadConversation(f"message {i} is not {{'role': one of {', '.join(ROLES)}, 'content': a string}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadConversation("no assistant message")
    return messages


class DefaultChat:
    """The default template over one of our tokenizers (tokenizer.py's)."""
    kind = "default"

    def __init__(self, tok):
        self.tok = tok
        self.base_vocab = tok.vocab_size
        self.special = {name: self.base_vocab + i for i, name in enumerate(SPECIALS)}
        self.vocab_size = self.base_vocab + len(SPECIALS)
        self.end_ids = {self.special["<|end|>"]}

    def _content(self, text):
        return list(self.tok.encode(text)) if text else []

    def encode(self, messages, add_generation_prompt=False):
        """(ids, mask): mask[i] = 1 where ids[i] is the assistant's (content and <|end|>)."""
        ids, mask = [], []
        for m in messages:
            body = self._content(m["content"]) + [self.special["<|end|>"]]
            ids += [self.special[f"<|{m['role']}|>"]] + body
            mask += [0] + [int(m["role"] == "assistant")] * len(body)
        if add_generation_prompt:
            ids.append(self.special["<|assistant|>"])
            mask.append(0)
        return ids, mask

    def decode(self, ids):
        """Text of ids; a special id reads as its name."""
        out, run = [], []
        for i in ids:
            if i >= self.base_vocab:
                out.append(self.tok.decode(run) + SPECIALS[i - self.base_vocab])
                run = []
            else:
                run.append(i)
        return "".join(out) + self.tok.decode(run)

    def meta(self):
        return {"template": "default", "special_tokens": self.special, "vocab_size": self.vocab_size,
                "template_fingerprint": fingerprint(DEFAULT_JINJA)}


class HFChat:
    """A transformers tokenizer's own chat_template."""
    kind = "hf"

    def __init__(self, hf_tok, source):
        if not hf_tok.chat_template:
            raise ChatError(f"{source}: the tokenizer has no chat_template; use a model with one (an "
                            f"instruct model) or our default template (an encoding of char, gpt2 or bpe:N)")
        self.hf, self.template = hf_tok, hf_tok.chat_template
        self.vocab_size = len(hf_tok)
        self.generation_blocks = "{% generation %}" in self.template.replace("{%- generation %}", "{% generation %}")
        self.end_ids = {i for i in (hf_tok.eos_token_id, hf_tok.convert_tokens_to_ids("<|im_end|>"),
                                    hf_tok.convert_tokens_to_ids("<|eot_id|>")) if i is not None and i != hf_tok.unk_token_id}

    def render(self, messages, add_generation_prompt=False):
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokens(self, text):
        return self.hf(text, add_special_tokens=False)["input_ids"]  # as apply_chat_template tokenizes

    def encode(self, messages, add_generation_prompt=False):
        if add_generation_prompt:
            return self.tokens(self.render(messages, True)), None
        if self.generation_blocks:
            out = self.hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
            return list(out["input_ids"]), list(out["assistant_masks"])
        return self._encode_by_prefixes(messages)

    def _encode_by_prefixes(self, messages):
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.render(messages[:i], True), self.render(messages[:i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise BadConversation(f"the chat template renders assistant message {i} differently in a "
                                      f"longer conversation, so its tokens cannot be found; give the "
                                      f"template {{% generation %}} blocks")
            spans.append((len(before), len(upto)))
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=False)

    def meta(self):
        return {"template": "hf", "chat_template": self.template, "vocab_size": self.vocab_size,
                "template_fingerprint": fingerprint(self.template)}


def hf_tokenizer_from_dir(hf_dir):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:  # a damaged tokenizer file surfaces as any exception (KeyError, bare Exception)
        reason = str(e).splitlines()[0] if str(e).strip() else ""
        raise ChatError(f"{hf_dir}: transformers cannot load its tokenizer ({type(e).__name__}"
                        f"{': ' + reason if reason else ''}); check its tokenizer.json and tokenizer_config.json")


def hf_tokenizer_from_meta(meta):
    """The transformers tokenizer of a dataset or checkpoint meta of encoding 'hf' (its
    tokenizer.json text and tokenizer_config), with the recorded chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    config = {k: v for k, v in (meta.get("tokenizer_config") or {}).items()
              if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    config = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items()}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(meta["tokenizer_json"]), **config)
    tok.chat_template = meta["chat"]["chat_template"]
    return tok


def chat_from_meta(meta, data_dir=None, source="the dataset"):
    """The chat template a dataset's (or checkpoint's) meta records; ChatError if none."""
    chat = meta.get("chat")
    if not chat:
        raise ChatError(f"{source} has no chat template (it was not prepared with data/chat/prepare.py); "
                        f"fine-tune it on conversations first (docs/chat.md)")
    if chat["template"] == "hf":
        if "tokenizer_json" not in meta:  # a data dir: the copied tokenizer.json
            import os
            with open(os.path.join(data_dir, meta.get("tokenizer_file", "tokenizer.json"))) as f:
                meta = {**meta, "tokenizer_json": f.read()}
        return HFChat(hf_tokenizer_from_meta(meta), source)
    from gpt_trainer.tokenizer import tokenizer_from_meta
    return DefaultChat(tokenizer_from_meta(meta, data_dir))


def to_array(mask):
    return np.asarray(mask, dtype=np.uint8)


def describe(meta):
    return json.dumps({k: v for k, v in meta.items() if k != "chat_template"})
