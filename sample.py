"""
Sample from a trained model or from GPT-2:

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2-xl --start="FILE:prompt.txt" --num_samples=3 --max_new_tokens=100

Settings are set like train.py's: a config file, then --key=value overrides; --help lists
them. Samples go to stdout, notes to stderr.
"""
import os
import sys

import torch

from configurator import UserError, configure, install_error_hook
from gpt_trainer.cpu_decode import FrozenDecode
from gpt_trainer.generate import WINDOWS, decode, generate_stream
from gpt_trainer.loading import load_model
from gpt_trainer.runtime import setup

# -----------------------------------------------------------------------------
# settings
init_from = "resume"  # 'resume' (a checkpoint in out_dir), 'gpt2*', or a GPT-2, Llama or Qwen3 HF dir
out_dir = "out"  # where init_from='resume' finds its checkpoint
ckpt = "auto"  # 'auto' = out_dir/best.pt if it exists, else out_dir/ckpt.pt; or a path
start = "\n"  # the prompt, or "FILE:path" to read it from a file
num_samples = 10  # samples, generated together as one batch
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = the model's distribution, lower = sharper, 0 = greedy
top_k = 200  # sample among the k most likely tokens only; 0 = no limit
top_p = 1.0  # nucleus sampling: the fewest tokens holding this much probability; 1.0 = off
seed = 1337  # the same seed and settings give the same samples
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bf16/fp16 on CUDA, fp32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model: a slow start, then faster tokens
use_cache = True  # KV cache: each new token attends to cached keys instead of recomputing
window = "exact"  # past block_size: 'exact', 'chunked' (faster) or 'sliding' (RoPE models, fastest)
stop = ""  # end a sample at this string (cut there; \n, \t, \\ ... are read as escapes); '' = only at end-of-text
stream = True  # with num_samples=1, print tokens as they arrive
# -----------------------------------------------------------------------------
SETTINGS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
SEPARATOR = "---------------"


class SampleError(UserError):
    """A bad setting of this script."""


def check_settings(s):
    if s["num_samples"] < 1 or s["max_new_tokens"] < 0:
        raise SampleError(f"num_samples={s['num_samples']} must be >= 1 and "
                          f"max_new_tokens={s['max_new_tokens']} >= 0")
    if s["temperature"] < 0 or s["top_k"] < 0 or not 0 < s["top_p"] <= 1:
        raise SampleError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                          f"{s['temperature']}, {s['top_k']}, {s['top_p']}")
    if s["window"] not in WINDOWS:
        raise SampleError(f"window={s['window']!r} is not one of {WINDOWS}")
    # the tokens of every sample are held in one (num_samples, prompt + max_new_tokens) int64
    # tensor, allocated up front: refuse what no memory holds instead of failing in the allocator
    need = s["num_samples"] * s["max_new_tokens"] * 8
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise SampleError(f"max_new_tokens={s['max_new_tokens']:,} x num_samples={s['num_samples']} needs "
                          f"{need / 2**30:,.1f} GiB for the tokens alone, more than half of this machine's "
                          f"{have / 2**30:,.1f} GiB; ask for fewer tokens")


def unescape(text):
    """--stop="\\n\\n" reaches Python as backslash, n, backslash, n (the shell keeps them):
    read Python's escape sequences, as in a string literal."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise SampleError(f"stop={text!r}: {e.reason} (a lone backslash? write \\\\ for one)")


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    if not os.path.isfile(path):
        raise SampleError(f"start=FILE:{path}: {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SampleError(f"start=FILE:{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save the prompt as UTF-8")


def encode_prompt(tok, text, block_size):
    ids = tok.encode(text)
    if not ids:
        if tok.eot_token is None:
            raise SampleError("start is empty and this tokenizer has no end-of-text token to "
                              "begin from; give a prompt with --start")
        ids = [tok.eot_token]  # GPT-2 style: a new document begins
    if len(ids) > block_size:
        print(f"note: the prompt is {len(ids)} tokens, longer than block_size {block_size}; "
              f"keeping its last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


class Sample:
    """One sample's generated text as its tokens arrive. It ends at the end-of-text token or at
    the stop string (cut there)."""

    def __init__(self, tok, stop):
        self.tok, self.stop = tok, stop
        self.ids, self.text, self.done = [], "", False
        self.shown = 0  # characters of text already printed while streaming

    def add(self, token):
        if token == self.tok.eot_token:
            self.done = True
            return
        self.ids.append(token)
        # decode everything so far: a multi-byte character may span several BPE tokens
        self.text = self.tok.decode(self.ids)
        if self.stop and self.stop in self.text:
            self.text, self.done = self.text[:self.text.index(self.stop)], True

    def new_text(self):
        """Text not yet printed that can no longer change: holds back a half-decoded
        character (U+FFFD for now) and a tail that might become the start of the stop string."""
        text = self.text
        if not self.done:
            text = text.rstrip("\ufffd")
            text = text[:max(0, len(text) - max(0, len(self.stop) - 1))]
        new = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return new


def generate_samples(model, prompt_ids, tok, settings, streaming, ctx, decode_fn=None):
    """All num_samples in one batch; print each sample as it ends (or token by token when
    streaming). Stops early once every sample has ended."""
    s = settings
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids] * s["num_samples"], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(s["seed"])
    prompt_text = tok.decode(prompt_ids)
    samples = [Sample(tok, s["stop"]) for _ in range(s["num_samples"])]
    printed = [False] * len(samples)
    if streaming:
        sys.stdout.write(prompt_text)
    with ctx:
        tokens = generate_stream(model, idx, s["max_new_tokens"], s["temperature"], s["top_k"] or None,
                                 s["top_p"], generator, s["use_cache"], s["window"],
                                 vocab_limit=tok.vocab_size,  # a padded vocab has unknown ids
                                 decode_fn=decode_fn)
        for next_token in tokens:
            for sample, token in zip(samples, next_token[:, 0].tolist()):
                if not sample.done:
                    sample.add(token)
            if streaming:
                sys.stdout.write(samples[0].new_text())
                sys.stdout.flush()
            else:
                print_finished(samples, printed, prompt_text)
            if all(sample.done for sample in samples):
                break
    for sample in samples:
        sample.done = True  # max_new_tokens reached: whatever is left is final
    if streaming:
        sys.stdout.write(samples[0].new_text() + "\n" + SEPARATOR + "\n")
    else:
        print_finished(samples, printed, prompt_text)
    return [prompt_text + sample.text for sample in samples]


def print_finished(samples, printed, prompt_text):
    for i, sample in enumerate(samples):
        if sample.done and not printed[i]:
            print(prompt_text + sample.text)
            print(SEPARATOR, flush=True)
            printed[i] = True


def prepare_model(model, device, compile_model, window="exact"):
    """(the model on device, checked against the window; the function of each decoding step,
    compiled with the model when compile_model)."""
    model.eval().to(device)
    if window == "sliding" and model.config.pos_emb != "rope":
        raise SampleError("window='sliding' needs a RoPE model (pos_emb='rope'); this one has learned "
                          "positions: use window='exact' or 'chunked'")
    if not compile_model:
        return model, decode
    model.compile(dynamic=True)  # in place: the prefill's self(...) calls
    if torch.device(device).type == "cpu":  # each token's step with the weights frozen in
        return model, FrozenDecode()
    return model, torch.compile(decode, dynamic=True)  # and each token's step (a CUDA graph's)


if __name__ == "__main__":
    install_error_hook()
    settings = configure({k: globals()[k] for k in SETTINGS}, sys.argv[1:], __file__)
    settings["stop"] = unescape(settings["stop"])
    globals().update(settings)
    check_settings(settings)

    torch.manual_seed(seed)
    rt = setup(device, dtype, distributed=False)  # one process, even under torchrun
    device, ctx = rt.device, rt.ctx
    model, tok, source, _ = load_model(init_from, out_dir, ckpt)
    model, decode_fn = prepare_model(model, device, compile, window)
    print(f"{source}: {model.get_num_params() / 1e6:.2f}M parameters, block_size "
          f"{model.config.block_size}, tokenizer {tok.name} ({tok.vocab_size} tokens), {device}",
          file=sys.stderr)
    prompt_ids = encode_prompt(tok, read_prompt(start), model.config.block_size)
    generate_samples(model, prompt_ids, tok, settings, stream and num_samples == 1, ctx, decode_fn)
