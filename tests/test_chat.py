"""
From conversations to a chat model (docs/chat.md): data/chat/prepare.py's layouts, templates
and masks; the masked loss of train.py on a chat data dir (its normalisation, exact resume);
chat.py against transformers' apply_chat_template + generate on random GPT-2, Llama and
Qwen3 models saved with a chat template (nothing downloaded).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainutil import REPO, char_data, child_env, load_ckpt, one_error_line, read_metrics, run_train, step_losses  # noqa: F401

transformers = pytest.importorskip("transformers")

from chat import Conversation, load  # noqa: E402
from gpt_trainer.chat_template import SPECIALS, DefaultChat, HFChat, chat_from_meta  # noqa: E402
from gpt_trainer.dataloader import load_meta  # noqa: E402
from gpt_trainer.sft import ChatBatchLoader, loss_sum, open_masks, sft_loss  # noqa: E402

PREPARE = os.path.join(REPO, "data", "chat", "prepare.py")
# a Qwen-style template whose assistant turns are {% generation %} blocks
GENERATION_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}{{- '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
PLAIN_TEMPLATE = GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
WORDS = "hello world reverse the word user assistant system what is a cat dog say again please"


def hf_tokenizer(path, template=PLAIN_TEMPLATE):
    """A small byte-level BPE with ChatML's special tokens and `template`, saved to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([WORDS] * 10, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    if template:
        hf.chat_template = template
    hf.save_pretrained(path)
    return hf


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world word"}, {"role": "user", "content": "say again"},
                {"role": "assistant", "content": "hello"}]


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def prepare(*args, check=True):
    p = subprocess.run([sys.executable, PREPARE, *args], cwd=REPO, env=child_env(), capture_output=True,
                       text=True, timeout=120)
    if check and p.returncode:
        pytest.fail(f"prepare exited {p.returncode}: {p.stderr[-2000:]}")
    return p


def read_split(data_dir, split):
    meta = load_meta(data_dir)
    ids = np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"])
    mask = np.fromfile(os.path.join(data_dir, f"{split}_mask.bin"), dtype=np.uint8)
    return ids, mask, meta


# -----------------------------------------------------------------------------
# prepare: layouts, the default template's masks, bad records, atomic data dir

LAYOUTS = [
    {"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"}]},
    {"conversations": [{"from": "human", "value": "abc"}, {"from": "gpt", "value": "cba"}]},
    {"instruction": "abc", "input": "", "output": "cba"},
]


def test_three_layouts_render_the_same_conversation(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", LAYOUTS * 4)
    prepare(f"--input={src}", "--encoding=char", f"--out_dir={tmp_path / 'd'}", "--val_fraction=0.25")
    for split in ("train", "val"):
        ids, mask, meta = read_split(str(tmp_path / "d"), split)
        chat = chat_from_meta(meta, str(tmp_path / "d"))
        one, one_mask = chat.encode(LAYOUTS[0]["messages"])
        assert len(ids) % len(one) == 0 and len(ids) == len(mask)
        assert (ids.reshape(-1, len(one)) == one).all() and (mask.reshape(-1, len(one)) == one_mask).all()
    # the mask covers exactly the assistant's content and its <|end|>
    assert chat.decode([t for t, m in zip(one, one_mask) if m]) == "cba<|end|>"
    assert meta["chat"]["vocab_size"] == meta["vocab_size"] + 4  # the char vocabulary grew
    assert meta["source"]["conversations"] == {"train": 9, "val": 3}


def test_default_template_on_gpt2_uses_unused_padded_ids():
    from trainutil import need_tiktoken
    need_tiktoken("gpt2")
    from gpt_trainer.tokenizer import get_tokenizer
    chat = DefaultChat(get_tokenizer("gpt2"))
    assert [chat.special[s] for s in SPECIALS] == [50257, 50258, 50259, 50260]
    ids, mask = chat.encode(CONVERSATION, add_generation_prompt=True)
    assert ids[-1] == 50259 and max(ids) < 50304
    assert chat.decode(ids).startswith("<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>world word")


def test_bad_records_strict_names_them_and_skip_counts_them(tmp_path):
    good = LAYOUTS * 3
    src = write_jsonl(tmp_path / "c.jsonl", good, ['{"messages": [{"role": "bot", "content": "x"}]}', "not json",
                                                   '{"text": "no conversation"}'])
    out = tmp_path / "d"
    p = prepare(f"--input={src}", "--encoding=char", f"--out_dir={out}", check=False)
    line = one_error_line(p.stderr)
    assert p.returncode == 1 and "c.jsonl:10" in line and "--errors=skip" in line, p.stderr
    assert not out.exists() or not os.listdir(out)  # nothing written
    prepare(f"--input={src}", "--encoding=char", f"--out_dir={out}", "--errors=skip")
    meta = load_meta(str(out))
    assert meta["source"]["skipped"] == 3
    assert sum(meta["source"]["conversations"].values()) == len(good)


def test_an_hf_dir_with_a_damaged_tokenizer_is_one_line(tmp_path):
    from gpt_trainer.chat_template import ChatError, hf_tokenizer_from_dir
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ChatError, match=rf"{tmp_path}: transformers cannot load its tokenizer \(\w+.*\); check "
                                        r"its tokenizer.json"):
        hf_tokenizer_from_dir(str(tmp_path))  # chat.py --hf=DIR, data/chat/prepare.py --encoding=hf:DIR
    p = prepare(f"--input={write_jsonl(tmp_path / 'c.jsonl', [{'messages': CONVERSATION}] * 2)}",
                f"--encoding=hf:{tmp_path}", f"--out_dir={tmp_path / 'd'}", check=False)
    assert p.returncode == 1 and "transformers cannot load its tokenizer" in one_error_line(p.stderr)


def test_failed_prepare_leaves_the_old_data_dir(tmp_path):
    out = tmp_path / "d"
    prepare(f"--input={write_jsonl(tmp_path / 'a.jsonl', LAYOUTS * 2)}", "--encoding=char", f"--out_dir={out}")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    p = prepare(f"--input={write_jsonl(tmp_path / 'b.jsonl', LAYOUTS, ['oops'])}", "--encoding=char",
                f"--out_dir={out}", check=False)
    assert p.returncode == 1
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_hf_template_masks_by_generation_blocks_and_by_prefixes(tmp_path):
    gen = HFChat(hf_tokenizer(tmp_path / "gen", GENERATION_TEMPLATE), "gen")
    plain = HFChat(hf_tokenizer(tmp_path / "plain", PLAIN_TEMPLATE), "plain")
    assert gen.generation_blocks and not plain.generation_blocks
    (ids_a, mask_a), (ids_b, mask_b) = gen.encode(CONVERSATION), plain.encode(CONVERSATION)
    # the same tokens as transformers' own tokenization of the template
    assert ids_a == ids_b == plain.hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert gen.decode([t for t, m in zip(ids_a, mask_a) if m]) == "world word<|im_end|>hello<|im_end|>"
    # by prefixes a span runs to where the next message starts: the template's "\n" as well
    extra = [t for t, a, b in zip(ids_a, mask_a, mask_b) if b and not a]
    assert all(a <= b for a, b in zip(mask_a, mask_b)) and plain.decode(extra) == "\n\n"


@pytest.mark.slow
def test_hf_prepare_and_no_template_error(tmp_path):
    hf_tokenizer(tmp_path / "tok", PLAIN_TEMPLATE)
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 4)
    prepare(f"--input={src}", f"--encoding=hf:{tmp_path / 'tok'}", f"--out_dir={tmp_path / 'd'}")
    ids, mask, meta = read_split(str(tmp_path / "d"), "train")
    chat = chat_from_meta(meta, str(tmp_path / "d"))
    assert meta["chat"]["template"] == "hf" and os.path.exists(tmp_path / "d" / "tokenizer.json")
    one, one_mask = chat.encode(CONVERSATION)
    assert list(ids[:len(one)]) == one and list(mask[:len(one)]) == one_mask
    hf_tokenizer(tmp_path / "none", template=None)
    p = prepare(f"--input={src}", f"--encoding=hf:{tmp_path / 'none'}", f"--out_dir={tmp_path / 'e'}", check=False)
    assert p.returncode == 1 and "has no chat_template" in one_error_line(p.stderr)


# -----------------------------------------------------------------------------
# the masked loss: sum over target tokens / the step's target count

@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """Reverse-a-word conversations, char encoding."""
    tmp = tmp_path_factory.mktemp("chatdata")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 5))) for _ in range(400)]
    src = write_jsonl(tmp / "c.jsonl", [{"messages": [{"role": "user", "content": f"reverse {w}"},
                                                      {"role": "assistant", "content": w[::-1]}]} for w in words])
    prepare(f"--input={src}", "--encoding=char", f"--out_dir={tmp / 'd'}")
    return str(tmp / "d")


def test_masked_eval_repeats_its_windows_and_stops_on_a_signal(chat_data):
    """estimate_masked_loss: the same windows every call (so evals compare); a stop signal
    between batches raises Interrupted (train.py then saves within seconds, as in a
    plain-text eval) and leaves the model in the mode it was in."""
    from contextlib import nullcontext
    from gpt_trainer.dataloader import open_dataset
    from gpt_trainer.evaluation import Interrupted
    from gpt_trainer.evaluation import estimate_masked_loss
    from model import GPT, GPTConfig
    splits, meta = open_dataset(chat_data, 16)
    masks = open_masks(chat_data, meta, splits)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=meta["chat"]["vocab_size"], n_layer=1, n_head=2, n_embd=16))
    args = (model, splits, masks, 16, 4, 3, nullcontext(), "cpu")
    first = estimate_masked_loss(*args)
    assert set(first) == {"train_loss", "val_loss"} and first == estimate_masked_loss(*args)
    assert model.training
    asked = []
    with pytest.raises(Interrupted):
        estimate_masked_loss(*args, should_stop=lambda: asked.append(1) or len(asked) == 2)
    assert len(asked) == 2 and model.training


def test_loss_scale_is_the_mean_over_the_steps_targets(chat_data):
    from gpt_trainer.dataloader import open_dataset
    from model import GPT, GPTConfig
    splits, meta = open_dataset(chat_data, 16)
    masks = open_masks(chat_data, meta, splits)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=meta["chat"]["vocab_size"], n_layer=1, n_head=2, n_embd=16))
    per_step = 4  # micro-batches of the step, over every rank
    loader = ChatBatchLoader(masks["train"], splits["train"], 16, 3, 7, per_step, prefetch=False)
    batches = [loader.get(5, i) for i in range(per_step)]
    # what train.py's loop sums: each micro-batch's sft_loss / micro-batches per step
    total = sum(sft_loss(model, x, y, loader.loss_scale(5)) / per_step for x, y in batches)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    logits, _ = model(x, all_logits=True)
    mean = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    torch.testing.assert_close(total, mean)
    assert (y >= 0).sum() == loader.targets_in_step(5) > 0
    assert 0 < (y >= 0).float().mean() < 0.5  # user tokens and role markers are not targets
    empty = torch.full_like(y[:1], -1)
    assert loss_sum(model, x[:1], empty).item() == 0.0  # no targets: no loss, not nan


SFT = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.1, gradient_accumulation_steps=2,
           warmup_iters=3, lr_decay_iters=12, eval_interval=4, eval_iters=2, learning_rate=3e-3)


@pytest.mark.slow
def test_sft_resume_is_bitwise(tmp_path, chat_data):
    from test_run_resume import assert_resume_is_exact, stop_and_resume
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    run_train(straight, chat_data, max_iters=12, **SFT)
    stop_and_resume(resumed, chat_data, 5, 12, **SFT)
    assert_resume_is_exact(straight, resumed, 12)
    losses = [r["val_loss"] for r in read_metrics(straight) if "val_loss" in r]
    assert losses[-1] < losses[0]


# -----------------------------------------------------------------------------
# chat.py against transformers

def random_hf_model(kind, path, tok):
    torch.manual_seed(0)
    V = len(tok)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=96, n_embd=32, n_layer=2, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cls = transformers.Qwen3Config if kind == "qwen3" else transformers.LlamaConfig
        cfg = cls(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=96, head_dim=16, tie_word_embeddings=kind == "qwen3",
                  initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = (transformers.Qwen3ForCausalLM if kind == "qwen3" else transformers.LlamaForCausalLM)(cfg)
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3"])
def test_chat_equals_transformers_generate(tmp_path, kind):
    tok = hf_tokenizer(tmp_path / "m", PLAIN_TEMPLATE)
    hf_model = random_hf_model(kind, tmp_path / "m", tok)
    model, chat, _ = load(None, hf=str(tmp_path / "m"))
    model.eval()
    conv = Conversation(model, chat)
    messages = []
    for text in ("hello", "say again please"):  # two turns: the second continues the cache
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=sorted(chat.end_ids), pad_token_id=0)[0, len(ids):].tolist()
            hf_logits = hf_model(torch.tensor([ids])).logits[0]
        ours = list(conv.reply(text, 12))
        assert ours == [t for t in ref if t not in chat.end_ids]
        with torch.no_grad():
            our_logits = model(torch.tensor([ids]), all_logits=True)[0][0]
        torch.testing.assert_close(our_logits, hf_logits, atol=1e-4, rtol=1e-4)
        messages.append({"role": "assistant", "content": tok.decode(ours)})
    assert conv.messages == messages


@pytest.mark.slow
def test_chat_cli_one_turn_and_no_template_error(tmp_path):
    tok = hf_tokenizer(tmp_path / "m", PLAIN_TEMPLATE)
    random_hf_model("qwen3", tmp_path / "m", tok)
    p = subprocess.run([sys.executable, "chat.py", f"--hf={tmp_path / 'm'}", "--prompt=hello", "--max_new_tokens=5",
                        "--device=cpu"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    model, chat, _ = load(None, hf=str(tmp_path / "m"))
    expected = chat.decode(list(Conversation(model.eval(), chat).reply("hello", 5)))
    assert p.stdout == expected + "\n"
    hf_tokenizer(tmp_path / "m", template=None)
    os.remove(tmp_path / "m" / "chat_template.jinja")
    p = subprocess.run([sys.executable, "chat.py", f"--hf={tmp_path / 'm'}", "--prompt=hello"], cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "has no chat_template" in one_error_line(p.stderr), p.stderr


# -----------------------------------------------------------------------------
# a skill the base model lacks, learned by SFT; what the mask changes

def exact_match(out_dir, words):
    model, chat, _ = load(out_dir)
    model.eval()
    replies = [chat.decode(list(Conversation(model, chat).reply(f"reverse {w}", 8))) for w in words]
    return sum(r == w[::-1] for r, w in zip(replies, words)) / len(words)


def non_assistant_loss(out_dir, data_dir):
    """Nats per token of val's targets that are not the assistant's (the user's side)."""
    model, _, _ = load(out_dir)
    ids, mask, _ = read_split(data_dir, "val")
    T = model.config.block_size
    n = (len(ids) - 1) // T * T
    x = torch.from_numpy(ids[:n].astype(np.int64)).view(-1, T)
    y = torch.from_numpy(ids[1:n + 1].astype(np.int64)).view(-1, T)
    y[torch.from_numpy(mask[1:n + 1].copy()).view(-1, T) == 1] = -1
    with torch.no_grad():
        logits, _ = model.eval()(x, all_logits=True)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).item()


@pytest.mark.slow
def test_sft_learns_a_skill_the_mask_matters(tmp_path):
    """config/sft_reverse_char.py on data/chat/synthetic.py's conversations: >= 90% exact replies
    on 200 held-out words. Without the mask the model also learns the user's side of the
    conversations (its loss there falls far below the masked model's, which never trained on
    it), with the same model and steps."""
    subprocess.run([sys.executable, "data/chat/synthetic.py", f"--out={tmp_path / 'c.jsonl'}",
                    f"--held_out={tmp_path / 'held.json'}"], cwd=REPO, check=True, capture_output=True)
    prepare(f"--input={tmp_path / 'c.jsonl'}", "--encoding=char", f"--out_dir={tmp_path / 'd'}")
    from trainutil import TINY
    drop = {k: None for k in TINY}
    words = json.load(open(tmp_path / "held.json"))
    results = {}
    for mask in (True, False):
        out = str(tmp_path / f"out-{mask}")
        run_train(out, str(tmp_path / "d"), "config/sft_reverse_char.py", timeout=900,
                  **{**drop, "loss_mask": mask})
        results[mask] = exact_match(out, words), non_assistant_loss(out, str(tmp_path / "d"))
    print(f"exact match / user-side loss: masked {results[True]}, unmasked {results[False]}")
    assert results[True][0] >= 0.9
    assert results[True][1] > results[False][1] + 1.0


# -----------------------------------------------------------------------------
# docs/chat.md's commands, in order, in a scratch copy of the repository

DOCS = os.path.join(REPO, "docs", "chat.md")


def doc_commands():
    from test_readme import COMMAND
    lines = open(DOCS).read().splitlines()
    return [line.strip() for line in lines if COMMAND.match(line)]


@pytest.mark.slow
def test_docs_chat_commands(tmp_path):
    import shutil

    from test_readme import plan
    commands = doc_commands()
    assert any("chat.py" in c for c in commands) and any("prepare.py" in c for c in commands)
    root = str(tmp_path / "repo")
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "__pycache__", ".pytest_cache"))
    ran = []
    for command in commands:
        if "path/to/hf_model" in command or "bench.py --lora" in command:
            continue  # an HF model of the user's (tests/test_lora.py trains imported ones); a 0.44B measurement
        for kind, what in plan(command):
            if kind != "run":
                continue
            if "chat.py" in what:
                what += " --device=cpu --max_new_tokens=8"
            p = subprocess.run(what, shell=True, cwd=root, env=child_env(), capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, f"{what}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
            ran.append(what)
    assert len(ran) >= 5, ran


@pytest.mark.slow
def test_exported_default_template_generates_as_chat_py(tmp_path):
    """Our default template on GPT-2's tokenizer: a checkpoint trained on it, exported with hf.py,
    gives with transformers' apply_chat_template + generate the replies and logits chat.py gives."""
    from trainutil import TINY, need_tiktoken
    need_tiktoken("gpt2")
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 40)
    prepare(f"--input={src}", "--encoding=gpt2", f"--out_dir={tmp_path / 'd'}", "--val_fraction=0.25")
    out = str(tmp_path / "out")
    run_train(out, str(tmp_path / "d"), **{**TINY, "block_size": 64, "max_iters": 2, "learning_rate": 0.1})
    p = subprocess.run([sys.executable, "export.py", f"--ckpt={out}/ckpt.pt", f"--out={tmp_path / 'hf'}"], cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model, chat, _ = load(out)
    conv, messages = Conversation(model.eval(), chat), []
    for text in ("hello", "say again"):
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ids == chat.encode(messages, add_generation_prompt=True)[0]
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                    eos_token_id=sorted(chat.end_ids), pad_token_id=0)[0, len(ids):].tolist()
            torch.testing.assert_close(model(torch.tensor([ids]), all_logits=True)[0][0],
                                       hf_model(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)
        ours = list(conv.reply(text, 10))
        assert ours == [t for t in ref if t not in chat.end_ids]
        messages.append({"role": "assistant", "content": chat.decode(ours)})


@pytest.mark.slow
def test_sft_loss_is_world_size_invariant(tmp_path, chat_data):
    """The same global micro-batches on 1 rank x 2 micro-steps and on 2 ranks x 1: the same
    losses and weights up to float summation order."""
    from trainutil import run_torchrun
    settings = {**SFT, "dropout": 0.0}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_train(one, chat_data, max_iters=6, **settings)
    run_torchrun(2, two, chat_data, max_iters=6, **settings)
    a, b = step_losses(read_metrics(one)), step_losses(read_metrics(two))
    assert sorted(a) == sorted(b) == list(range(6))
    np.testing.assert_allclose([a[i] for i in range(6)], [b[i] for i in range(6)], rtol=1e-5)
    for k, t in load_ckpt(one)["model"].items():
        torch.testing.assert_close(t, load_ckpt(two)["model"][k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_char_model_fine_tunes_only_on_its_own_characters(tmp_path, char_data):
    """docs/chat.md's char-level path as commands: a char base exported, chat data prepared with
    its own characters refused by train.py (one line, out_dir not created), the same data
    prepared with --encoding=char:EXPORTED_DIR fine-tuned, and sample.py on the exported dir."""
    from trainutil import TINY
    base, hf_dir = str(tmp_path / "base"), str(tmp_path / "hf")
    run_train(base, char_data, **{**TINY, "block_size": 64, "max_iters": 4})
    p = subprocess.run([sys.executable, "export.py", f"--ckpt={base}/ckpt.pt", f"--out={hf_dir}"], cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "its characters in meta.json" in p.stdout, p.stderr
    convs = [{"messages": [{"role": "user", "content": "Who art thou?"},
                           {"role": "assistant", "content": "A king, my lord."}]}] * 30
    src = write_jsonl(tmp_path / "c.jsonl", convs)
    prepare(f"--input={src}", "--encoding=char", f"--out_dir={tmp_path / 'own'}")
    prepare(f"--input={src}", f"--encoding=char:{hf_dir}", f"--out_dir={tmp_path / 'based'}")
    settings = {**TINY, "n_layer": None, "n_head": None, "n_embd": None, "block_size": 64, "max_iters": 3,
                "init_from": hf_dir}
    p = run_train(str(tmp_path / "ft_own"), str(tmp_path / "own"), check=False, **settings)
    assert p.returncode == 1 and f"prepare the data with --encoding=char:{hf_dir} (" in one_error_line(p.stderr)
    assert not os.path.exists(tmp_path / "ft_own")
    run_train(str(tmp_path / "ft"), str(tmp_path / "based"), **settings)
    assert load_ckpt(str(tmp_path / "ft"))["meta"]["chars"] == load_meta(char_data)["chars"]
    p = subprocess.run([sys.executable, "sample.py", f"--init_from={hf_dir}", "--start=KING", "--num_samples=1",
                        "--max_new_tokens=20", "--device=cpu"], cwd=REPO, env=child_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "KING" in p.stdout, p.stderr
    # the chat model exported: chat.py talks to the dir as to the checkpoint (the same weights)
    ft_hf = str(tmp_path / "ft_hf")
    p = subprocess.run([sys.executable, "export.py", f"--ckpt={tmp_path / 'ft'}/ckpt.pt", f"--out={ft_hf}"], cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    replies = [subprocess.run([sys.executable, "chat.py", source, "--prompt=Who art thou?", "--max_new_tokens=30",
                               "--device=cpu"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
               for source in (f"--out_dir={tmp_path / 'ft'}", f"--hf={ft_hf}")]
    assert all(r.returncode == 0 for r in replies), [r.stderr for r in replies]
    assert replies[0].stdout == replies[1].stdout
