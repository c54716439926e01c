"""
Our GPT as a model of EleutherAI's lm-evaluation-harness (lm_eval): any harness task, on any
model this project loads (a checkpoint of ours or of nanoGPT, a Hugging Face GPT-2, Llama or
Qwen3 directory), with the model's own tokenizer.

    python evaluate.py --out_dir=out-shakespeare-char --tasks=lm_eval:arc_easy,piqa
    python evaluate.py --out_dir=out --tasks=lm_eval:my_tasks/task.yaml     # a task file you wrote
    python harness.py run --model gpt-trainer --model_args path=out --tasks arc_easy   # lm_eval's own CLI

Scoring follows the harness's HF backend (HFLM): the same tokenization of context and
continuation, the same cut from the left to block_size + 1 tokens, the same rolling windows for
perplexity, so a model scores the same through either (tested on an exported model). generate_until runs our KV-cache generation on batches of prompts of one length.
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from gpt_trainer.errors import DataError, UserError
from gpt_trainer.generate import generate_stream

LM_EVAL = "lm_eval:"  # the prefix of harness results' keys (evaluation.LM_EVAL, which imports this module)


class HarnessError(UserError):
    """A harness task or model that cannot run: reported to the user as one line."""


class Unreadable(Exception):
    """Text with a character outside a char model's vocabulary."""


class GPTLM(TemplateLM):
    """Our model and its tokenizer as an lm_eval model (harness.py registers it, loading a path, as
    'gpt-trainer' for lm_eval's command line). Requests are scored in batches of batch_size under
    ctx (autocast; default: dtype's on the model's device)."""

    def __init__(self, model, tokenizer, batch_size=8, dtype="auto", max_gen_toks=256, seed=1234, ctx=None,
                 check=None):
        super().__init__()
        from gpt_trainer.runtime import autocast_context, resolve_dtype
        self.model, self.tok = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        device_type = self._device.type
        self.ctx = ctx or autocast_context(device_type, resolve_dtype(dtype, device_type))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # 'auto': our default
        self.max_length, self.max_gen_toks, self.seed = model.config.block_size, int(max_gen_toks), int(seed)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise HarnessError(f"the model has vocab_size {model.config.vocab_size} but its tokenizer "
                               f"({tokenizer.name}) has {tokenizer.vocab_size} tokens")
        if dist.is_initialized():  # the harness shares requests out across ranks itself
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self.unreadable = 0  # requests a char model could not read (scored -inf / left empty)
        self.check = check or (lambda: None)  # called before every batch: raises to stop (a signal)

    # -------------------------------------------------------------------------
    # tokenizer

    @property
    def eot_token_id(self):
        return self.tok.eot_token

    @property
    def prefix_token_id(self):
        """What an empty context and the first rolling window condition on: the end-of-text token
        (as HFLM's GPT-2); a char model has none, and its documents end with a newline."""
        if self.tok.eot_token is not None:
            return self.tok.eot_token
        try:
            return self.tok.encode("\n")[0]
        except DataError:
            return 0  # a vocabulary without newlines: its first character

    @property
    def tokenizer_name(self):
        return self.tok.name

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        try:
            return self.tok.encode(string)
        except DataError as e:
            raise Unreadable(str(e))

    def tok_decode(self, ids):
        return self.tok.decode(ids)

    def readable(self, text):
        try:
            self.tok_encode(text)
            return True
        except Unreadable:
            self.unreadable += 1
            return False

    # -------------------------------------------------------------------------
    # scoring

    def loglikelihood(self, requests, disable_tqdm=True):
        """(log p(continuation | context), greedy?) per request, as TemplateLM encodes them; a
        request a char model cannot read scores -inf (never the chosen answer)."""
        ok = [i for i, r in enumerate(requests) if self.readable("".join(r.args))]
        scores = super().loglikelihood([requests[i] for i in ok], disable_tqdm=True) if ok else []
        out = [(-math.inf, False)] * len(requests)
        for i, s in zip(ok, scores):
            out[i] = s
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=True):
        """log p(text) per request: disjoint windows of block_size predicted tokens, the first
        conditioned on prefix_token_id, each later one on the token before it (context_len=1),
        the last with a full block of context (the harness's and HFLM's windows)."""
        rows, owner, out = [], [], [0.0] * len(requests)
        for i, (text,) in enumerate(r.args for r in requests):
            if not self.readable(text):
                out[i] = -math.inf
                continue
            windows = utils.get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                      self.max_length, 1)
            for context, continuation in map(utils.make_disjoint_window, windows):
                rows.append((None, context, continuation))
                owner.append(i)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(rows)):
            out[i] += logprob
        return out

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=True, **kwargs):
        """[(logprob, greedy?)] for [(key, context ids, continuation ids)]: context + continuation
        cut from the left to block_size + 1 tokens, longest first in batches padded on the right
        (a causal model never sees the padding)."""
        L = self.max_length
        rows = [((ctx + cont)[-(L + 1):], min(len(cont), L)) for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            self.check()
            batch = [rows[i] for i in order[start:start + self.batch_size]]
            for i, score in zip(order[start:start + self.batch_size], self._score_batch(batch)):
                out[i] = score
        return out

    def _score_batch(self, batch):
        T = len(batch[0][0]) - 1  # the longest row, first
        x = torch.zeros(len(batch), T, dtype=torch.long)
        for i, (ids, _) in enumerate(batch):
            x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        with self.ctx:
            logits, _ = self.model(x.to(self._device), all_logits=True)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # over the whole (padded) vocabulary, as HFLM
        scores = []
        for i, (ids, n) in enumerate(batch):
            end = len(ids) - 1
            target = torch.tensor(ids[-n:], device=self._device)
            rows = logprobs[i, end - n:end]
            greedy = bool((rows.argmax(-1) == target).all())
            scores.append((rows.gather(-1, target[:, None]).double().sum().item(), greedy))
        return scores

    # -------------------------------------------------------------------------
    # generation

    def generate_until(self, requests, disable_tqdm=True):
        """Text generated after each context until a stop string (or end-of-text), cut there.
        Requests with the same generation settings and prompt length run as one batch."""
        eos = self.tok.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        groups, out = {}, [""] * len(requests)
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos)
            max_new = kwargs.pop("max_gen_toks")
            if not self.readable(context):
                continue
            # leave room for max_new tokens in the block when there is; past block_size the
            # generation recomputes its last block_size tokens (window='exact')
            keep = self.max_length - max_new if self.max_length > max_new else self.max_length
            ids = (self.tok_encode(context) or [self.prefix_token_id])[-keep:]
            key = (json.dumps(kwargs, sort_keys=True, default=str), json.dumps(until), max_new, len(ids))
            groups.setdefault(key, []).append((i, ids))
        for (kwargs, until, max_new, _), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                self.check()
                chunk = members[start:start + self.batch_size]
                texts = self._generate([ids for _, ids in chunk], json.loads(kwargs), json.loads(until), max_new)
                for (i, _), text in zip(chunk, texts):
                    out[i] = text
        return out

    def _generate(self, prompts, kwargs, until, max_new):
        idx = torch.tensor(prompts, dtype=torch.long, device=self._device)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)  # leaves torch's RNG alone
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        with self.ctx:
            steps = generate_stream(self.model, idx, max_new, temperature, kwargs.get("top_k"), kwargs.get("top_p"),
                                    generator, use_cache=True, vocab_limit=self.tok.vocab_size)
            for token in steps:
                for row, t in enumerate(token[:, 0].tolist()):
                    if done[row]:
                        continue
                    if t == self.eot_token_id:
                        done[row] = True
                        continue
                    new[row].append(t)
                    done[row] = any(s and s in self.tok.decode(new[row]) for s in until)
                if all(done):
                    break
        return [postprocess_generated_text(self.tok.decode(ids), until, None) for ids in new]

    # -------------------------------------------------------------------------
    # the harness's collectives, over torch.distributed (it shares requests out across ranks)

    def all_gather(self, tensor):
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        parts = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


# -----------------------------------------------------------------------------
# tasks for evaluate.py and train.py

def task_manager(specs, include_path=""):
    """The harness's TaskManager. Indexing its ~15,000 built-in tasks takes seconds, so it is
    skipped when every spec is a task file (or found in include_path)."""
    from lm_eval.tasks import TaskManager
    if include_path and not os.path.isdir(include_path):
        raise HarnessError(f"lm_eval_include_path={include_path}: no such directory")
    local = TaskManager(include_path=include_path or None, include_defaults=False)
    if all(s.endswith((".yaml", ".yml")) or s in local.all_tasks for s in specs):
        return local
    return TaskManager(include_path=include_path or None)


def load_harness_tasks(specs, include_path="", num_fewshot=None):
    """The harness's loaded tasks ({'tasks': {name: Task}, 'groups': ...}) for the specs, read once:
    offline, a task whose data is not local fails here, with the reason, not mid-training. Few-shot
    settings as simple_evaluate sets them: num_fewshot (None = each task's own, else 0) and seed 1234."""
    for s in specs:
        if s.endswith((".yaml", ".yml")) and not os.path.isfile(s):
            raise HarnessError(f"lm_eval:{s}: task file not found")
    manager = task_manager(specs, include_path)
    try:
        loaded = manager.load(specs)
    except KeyError as e:
        raise HarnessError(f"lm_eval: {e.args[0]}; `lm_eval ls tasks` lists the harness's tasks")
    except FileNotFoundError as e:  # a task file's data_files
        raise HarnessError(f"lm_eval:{','.join(specs)}: {str(e).splitlines()[0][:300]} (data_files paths are "
                           f"relative to the directory the command runs in)")
    except (OSError, ConnectionError, ValueError) as e:  # offline, a hub dataset
        raise HarnessError(f"lm_eval:{','.join(specs)}: cannot load the task's data ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]}); offline, use a task file whose dataset_path is "
                           f"json with local data_files")
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    return loaded


def score_harness(loaded, model, tok, batch_size, ctx, limit=0, log_samples=False, check=None):
    """{'lm_eval:<task>_<metric>': value, 'lm_eval:<task>_n': examples} for tasks from
    load_harness_tasks, through the harness's evaluate() (what simple_evaluate runs, without
    reseeding the run's RNGs or collecting pip's package list). A metric of a filter other than
    'none' is named <metric>_<filter>; no stderr (bootstrap_iters=0). Every rank calls it; the
    numbers come back on rank 0 (the harness shares the requests out across ranks). check() is
    called before every batch, and may raise to stop the scoring."""
    from lm_eval.evaluator import evaluate
    lm = GPTLM(model=model, tokenizer=tok, batch_size=batch_size, ctx=ctx, check=check)
    was_training = model.training
    try:
        results = evaluate(lm=lm, task_dict=loaded, limit=limit or None, bootstrap_iters=0, log_samples=log_samples,
                           verbosity="WARNING")
    finally:
        model.train(was_training)
    if lm.unreadable and lm.rank == 0:
        print(f"note: lm_eval: {lm.unreadable} requests held characters outside the model's vocabulary "
              f"(scored -inf, or generated nothing)", file=sys.stderr)
    if results is None:
        return {}
    return (flatten_results(results), results) if log_samples else flatten_results(results)


def flatten_results(results):
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            out[f"{LM_EVAL}{task}_{name}" + ("" if filt == "none" else f"_{filt}")] = value
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            out[f"{LM_EVAL}{task}_n"] = n
    return out
