"""
Evaluation: loss and bits per byte over a fixed set of windows of each split, and
multiple-choice tasks (HellaSwag) scored by the loss of each ending. train.py calls
estimate_loss and score_tasks at its evaluations; evaluate.py is the standalone command.

Work is shared out across ranks by a fixed rule and each batch's sums are gathered, never
re-added per rank, so every number is bitwise the same at any world size.
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt_trainer.dataloader import get_batch, random_starts, read_windows
from gpt_trainer.errors import ConfigError, DataError
from gpt_trainer.fsutil import download
from gpt_trainer.sft import loss_sum, masked_targets, read_masks
from gpt_trainer.tokenizer import BPETokenizer, CharTokenizer, TiktokenTokenizer, token_table, tokenizer_from_meta

EVAL_SEED = 0  # eval windows do not depend on the run's seed, so runs with different seeds compare
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


class Interrupted(Exception):
    """A stop signal arrived during an evaluation (should_stop() said so): its results are
    dropped, and the caller saves what it has within seconds rather than after the whole eval."""


def check_stop(should_stop):
    # every rank calls should_stop at the same batches (the loops are padded to the same
    # length), so under torchrun it may be a collective
    if should_stop is not None and should_stop():
        raise Interrupted()


def sum_dtype(device):
    return torch.float32 if str(device).startswith("mps") else torch.float64  # MPS has no float64


# -----------------------------------------------------------------------------
# bits per byte

def token_byte_lengths(tok, vocab_size=0):
    """(max(vocab_size, tok.vocab_size),) int64: the UTF-8 bytes each token id decodes to.
    Special tokens (end-of-text), ids the tokenizer leaves undefined and a model's padding ids
    count 0 bytes: they are not text, and bits per byte leaves them out."""
    if isinstance(tok, CharTokenizer):
        lengths = [len(piece) for piece in token_table(tok)]
    elif isinstance(tok, TiktokenTokenizer):
        special = {tok.enc.encode_single_token(t) for t in tok.enc.special_tokens_set}
        lengths = [0 if i in special or piece is None else len(piece) for i, piece in enumerate(token_table(tok))]
    elif isinstance(tok, BPETokenizer):
        lengths = _byte_level_lengths(tok.tok)
    else:
        raise TypeError(f"no byte lengths for {type(tok).__name__}")
    return torch.tensor(lengths + [0] * (vocab_size - len(lengths)), dtype=torch.int64)


def _byte_level_lengths(tk):
    from tokenizers import pre_tokenizers
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # byte-level BPE: one character per byte
    added = set(tk.get_added_tokens_decoder())
    lengths = []
    for i in range(tk.get_vocab_size()):
        piece = tk.id_to_token(i)
        if i in added or piece is None:
            lengths.append(0)
        elif set(piece) <= alphabet:
            lengths.append(len(piece))
        else:
            lengths.append(len(tk.decode([i]).encode("utf-8")))
    return lengths


def eval_tokenizer(meta, data_dir, required, quiet=False):
    """The dataset's tokenizer, for bits per byte and tasks. Without it (e.g. tiktoken's cache
    missing offline) training goes on without bpb, unless a task needs it."""
    try:
        return tokenizer_from_meta(meta, data_dir)
    except DataError as e:
        if required:
            raise
        if not quiet:
            print(f"note: no bits per byte ({e})", file=sys.stderr)
        return None


# -----------------------------------------------------------------------------
# loss and bits per byte over a fixed set of windows

@torch.no_grad()
def estimate_loss(model, splits, block_size, batch_size, eval_iters, ctx, device, rank=0, world_size=1,
                  token_bytes=None, should_stop=None):
    """{'<split>_loss': nats per token, and with token_bytes '<split>_bpb': bits per byte} over
    the same eval_iters batches of each split every time. bpb = the nats of the targets that
    are text / (ln 2 x the UTF-8 bytes they decode to). Batch k runs on rank k % world_size.
    should_stop() is asked before every batch; when it says so, Interrupted is raised."""
    was_training = model.training
    model.eval()
    try:
        return _estimate_loss(model, splits, block_size, batch_size, eval_iters, ctx, device, rank, world_size,
                              token_bytes, should_stop)
    finally:
        model.train(was_training)


def _estimate_loss(model, splits, block_size, batch_size, eval_iters, ctx, device, rank, world_size,
                   token_bytes, should_stop):
    out = {}
    if token_bytes is not None:
        token_bytes = token_bytes.to(device)
    for split, data in splits.items():
        sums = torch.zeros(eval_iters, 3, dtype=sum_dtype(device), device=device)  # nats, text nats, bytes
        padded = -(-eval_iters // world_size) * world_size  # FSDP: every rank runs every forward
        for k in range(rank, padded, world_size):
            check_stop(should_stop)
            x, y = get_batch(data, block_size, batch_size, EVAL_SEED, k % eval_iters, 0)
            if torch.device(device).type == "cuda":  # page-locked: the copy does not wait for the GPU
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with ctx:
                logits, _ = model(x, y)
            if k >= eval_iters:
                continue
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").to(sums.dtype)
            nbytes = token_bytes[y.flatten()] if token_bytes is not None else torch.ones_like(nats)
            sums[k] = torch.stack([nats.sum(), (nats * (nbytes > 0)).sum(), nbytes.sum().to(sums.dtype)])
        if world_size > 1:
            dist.all_reduce(sums)  # each row is one rank's, the others add zeros: exact
        nats, text_nats, nbytes = sums.cpu().sum(0).tolist()
        out[f"{split}_loss"] = nats / (eval_iters * batch_size * block_size)
        if token_bytes is not None:
            out[f"{split}_bpb"] = text_nats / nbytes / math.log(2) if nbytes else float("nan")
    return out


@torch.no_grad()
def estimate_masked_loss(model, splits, masks, block_size, batch_size, eval_iters, ctx, device, rank=0,
                         world_size=1, should_stop=None):
    """{'<split>_loss'}: nats per assistant token over the same eval_iters random windows of each
    split every time (estimate_loss's windows). Batch k runs on rank k % world_size.
    should_stop() is asked before every batch, as estimate_loss does (Interrupted)."""
    out, was_training = {}, model.training
    model.eval()
    try:
        for split, data in splits.items():
            sums = torch.zeros(eval_iters, 2, dtype=sum_dtype(device), device=device)  # nats, targets
            padded = -(-eval_iters // world_size) * world_size
            for k in range(rank, padded, world_size):
                check_stop(should_stop)
                starts = random_starts(len(data), block_size, batch_size, EVAL_SEED, k % eval_iters, 0)
                x, y = read_windows(data, starts, block_size)
                y = masked_targets(y, read_masks(masks[split], starts, block_size))
                with ctx:
                    nats = loss_sum(model, x.to(device), y.to(device))
                if k < eval_iters:
                    sums[k] = torch.stack([nats.to(sums.dtype), (y >= 0).sum().to(sums.dtype)])
            if world_size > 1:
                dist.all_reduce(sums)
            nats, count = sums.cpu().sum(0).tolist()
            out[f"{split}_loss"] = nats / count if count else math.nan
    finally:
        model.train(was_training)
    return out


# -----------------------------------------------------------------------------
# multiple choice: the ending with the lowest loss is the model's answer

def encode_examples(examples, tok, block_size):
    """([(label, [(ids, n) per ending])], number left out). ids are the context's tokens, then
    the ending's (" " + ending: HellaSwag's endings follow a space), cut from the left to
    block_size + 1 tokens; the last n are the ending. An example with a character outside a
    char model's vocabulary or an ending longer than block_size is left out."""
    encoded, left_out = [], 0
    for ex in examples:
        try:
            ctx_ids = tok.encode(ex["ctx"])
            endings = [tok.encode(" " + e) for e in ex["endings"]]
        except DataError:
            left_out += 1
            continue
        if not ctx_ids or not all(0 < len(e) <= block_size for e in endings):
            left_out += 1
            continue
        encoded.append((ex["label"], [((ctx_ids + e)[-(block_size + 1):], len(e)) for e in endings]))
    return encoded, left_out


@torch.no_grad()
def ending_losses(model, rows, batch_size, ctx, device, rank=0, world_size=1, should_stop=None):
    """(len(rows),) float64: the summed nats of each row's last n tokens given the ones before,
    for rows = [(ids, n)]. Batches of batch_size consecutive rows are padded on the right (a
    causal model never sees the padding); batch b runs on rank b % world_size."""
    sums = torch.zeros(len(rows), dtype=sum_dtype(device), device=device)
    was_training = model.training
    model.eval()
    try:
        _ending_losses(model, rows, batch_size, ctx, device, rank, world_size, should_stop, sums)
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)  # each entry is one rank's, the others add zeros: exact
    return sums.cpu().double()


def _ending_losses(model, rows, batch_size, ctx, device, rank, world_size, should_stop, sums):
    num_batches = -(-len(rows) // batch_size)
    padded = -(-num_batches // world_size) * world_size  # FSDP: every rank runs every forward
    for b in range(rank, padded, world_size):
        check_stop(should_stop)
        start = b % num_batches * batch_size
        batch = rows[start:start + batch_size]
        T = max(len(ids) for ids, _ in batch) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), -1, dtype=torch.long)  # -1: no loss
        for i, (ids, n) in enumerate(batch):
            x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[i, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[-n:])
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _ = model(x, y)
        if b >= num_batches:
            continue
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
        sums[start:start + len(batch)] = nats.view(len(batch), T).to(sums.dtype).sum(1)


def only_lowest(losses, label):
    """The right ending has a lower loss than every other: a tie (e.g. two identical endings)
    is not a right answer, whichever index the label names."""
    return all(loss > losses[label] for i, loss in enumerate(losses) if i != label)


def score_multiple_choice(model, encoded, batch_size, ctx, device, rank=0, world_size=1, should_stop=None):
    """{'acc', 'acc_norm', 'n'}: the fraction of examples whose right ending has the lowest
    total loss (acc) and the lowest loss per token of the ending (acc_norm, as llm.c and
    nanochat score HellaSwag, so GPT-2's published numbers compare)."""
    rows = [row for _, endings in encoded for row in endings]
    losses = ending_losses(model, rows, batch_size, ctx, device, rank, world_size,
                           should_stop).tolist() if rows else []
    correct = correct_norm = i = 0
    for label, endings in encoded:
        total = losses[i:i + len(endings)]
        per_token = [s / n for s, (_, n) in zip(total, endings)]
        correct += only_lowest(total, label)
        correct_norm += only_lowest(per_token, label)
        i += len(endings)
    n = len(encoded)
    return {"acc": correct / n if n else float("nan"), "acc_norm": correct_norm / n if n else float("nan"), "n": n}


# -----------------------------------------------------------------------------
# tasks

def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def load_hellaswag(path, url=HELLASWAG_URL):
    """HellaSwag's validation split as [{'ctx', 'endings', 'label'}] (10,042 examples in the
    official file), downloaded from its official location when path is missing."""
    if not os.path.exists(path):
        try:
            download(url, path)
        except DataError as e:
            raise DataError(f"{e}, or leave hellaswag out of the tasks") from None
    examples = []
    try:
        lines = _read_lines(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); delete the "
                        f"file to download it again")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            ex = {"ctx": ex["ctx"], "endings": ex["endings"], "label": ex["label"]}
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} line {n}: not a HellaSwag example ({type(e).__name__}: {e}); "
                            f"delete the file to download it again")
        endings = ex["endings"]
        if not (isinstance(ex["ctx"], str) and isinstance(endings, list) and len(endings) >= 2
                and all(isinstance(e, str) for e in endings) and type(ex["label"]) is int
                and 0 <= ex["label"] < len(endings)):
            raise DataError(f"{path} line {n}: needs a ctx string, a list of ending strings and a "
                            f"label indexing them; delete the file to download it again")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path} holds no examples; delete it to download it again")
    return examples


TASKS = {"hellaswag": load_hellaswag}  # name -> loader(path) of its examples


LM_EVAL = "lm_eval:"  # in a tasks setting: this entry and every one after it are lm-evaluation-harness tasks


def split_tasks(names):
    """(our task names, harness task specs) of a comma-separated tasks setting: the first entry
    that starts with 'lm_eval:' and every one after it are the harness's (a task, a group or a
    path to a task YAML), so 'val,hellaswag,lm_eval:arc_easy,piqa' is two of ours, two of its."""
    entries = [t.strip() for t in names.split(",") if t.strip()]
    first = next((i for i, t in enumerate(entries) if t.startswith(LM_EVAL)), len(entries))
    return entries[:first], [t.removeprefix(LM_EVAL).strip() for t in entries[first:]]


def parse_tasks(names, setting, extra=()):
    """The task names of a comma-separated setting, each one known; harness tasks are
    'lm_eval:<spec>' each (see split_tasks)."""
    ours, harness = split_tasks(names)
    for t in ours:
        if t not in TASKS and t not in extra:
            raise ConfigError(f"{setting}={names!r}: unknown task {t!r}; known: {', '.join([*extra, *TASKS])}, "
                              f"or lm_eval:NAME for lm-evaluation-harness tasks")
    if not all(harness):
        raise ConfigError(f"{setting}={names!r}: 'lm_eval:' must be followed by a harness task name or a task YAML path")
    return ours + [LM_EVAL + h for h in harness]


class HarnessTasks:
    """lm-evaluation-harness tasks, loaded (harness.load_harness_tasks), with what scoring them needs."""

    def __init__(self, loaded, tok, max_examples):
        self.loaded, self.tok, self.max_examples = loaded, tok, max_examples


def load_tasks(names, paths, tok, block_size, max_examples=0, rank=0, ddp=False, include_path="", num_fewshot=None):
    """{task: encoded examples} (see encode_examples), the first max_examples of each (0 = all),
    and under 'lm_eval' the harness's tasks (HarnessTasks). Rank 0 reads first (downloading a
    missing file), then the other ranks."""
    out = {}
    specs = [n.removeprefix(LM_EVAL) for n in names if n.startswith(LM_EVAL)]
    for name in [n for n in names if not n.startswith(LM_EVAL)] + (["lm_eval"] if specs else []):
        if ddp and rank != 0:
            dist.barrier()
        try:
            if name == "lm_eval":
                from gpt_trainer.harness import load_harness_tasks
                out[name] = HarnessTasks(load_harness_tasks(specs, include_path, num_fewshot), tok, max_examples)
                continue
            examples = TASKS[name](paths[name])
        finally:
            if ddp and rank == 0:
                dist.barrier()
        encoded, left_out = encode_examples(examples[:max_examples or None], tok, block_size)
        if rank == 0 and left_out:
            print(f"note: {name}: {left_out} of {len(encoded) + left_out} examples left out (characters "
                  f"outside the vocabulary or an ending longer than block_size)", file=sys.stderr)
        out[name] = encoded
    return out


def score_tasks(tasks, model, batch_size, ctx, device, rank=0, world_size=1, should_stop=None):
    """{'<task>_acc', '<task>_acc_norm', '<task>_n'} for tasks from load_tasks."""
    out = {}
    for name, encoded in tasks.items():
        if name == "lm_eval":
            from gpt_trainer.harness import score_harness
            # one process only: the harness's ranks run different numbers of batches, and
            # should_stop may be a collective (then a signal is heard once the tasks are scored)
            check = (lambda: check_stop(should_stop)) if world_size == 1 else None
            out.update(score_harness(encoded.loaded, model, encoded.tok, batch_size, ctx, encoded.max_examples,
                                     check=check))
            continue
        scores = score_multiple_choice(model, encoded, batch_size, ctx, device, rank, world_size, should_stop)
        out.update({f"{name}_{k}": v for k, v in scores.items()})
    return out


def format_results(r):
    """'train loss 1.2345, val loss 1.3456, val bpb 1.9413, hellaswag acc 0.2859 acc_norm 0.2955'"""
    parts = [f"{split} loss {r[f'{split}_loss']:.4f}" for split in ("train", "val") if f"{split}_loss" in r]
    parts += [f"val bpb {r['val_bpb']:.4f}"] if "val_bpb" in r else []
    parts += [f"{name} acc {r[f'{name}_acc']:.4f} acc_norm {r[f'{name}_acc_norm']:.4f}"
              for name in TASKS if f"{name}_acc" in r]
    parts += [f"{k} {v:.4f}" for k, v in r.items() if k.startswith(LM_EVAL) and not k.endswith("_n")]
    return ", ".join(parts)
