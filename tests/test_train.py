"""
The core trainer: learning-rate schedule, settings, the training loop's numbers, checkpoints
and clear one-line errors for bad settings, checkpoints and data. train.py runs as a
subprocess on a tiny model over a char-level tinyshakespeare (see trainutil.py).
"""
import math
import os
import shutil
import subprocess
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from trainutil import (REPO, TRAIN, char_data, eval_losses, load_ckpt, one_error_line, read_metrics,  # noqa: F401
                       run_raw, run_train, step_losses, write_char_dataset)

import sys  # noqa: E402

from gpt_trainer import checkpoint  # noqa: E402
import configurator  # noqa: E402
import train  # noqa: E402  (SETTINGS only: the script is under `if __name__ == "__main__"`)
from gpt_trainer.dataloader import TokenFile, get_batch, load_meta, open_dataset  # noqa: E402
from gpt_trainer.evaluation import estimate_loss  # noqa: E402
from model import GPTConfig  # noqa: E402

# -----------------------------------------------------------------------------
# train.py's command line (configure() itself: test_configurator.py)


def test_cli_unknown_key():
    p = run_raw(["--learning_rat=1"])
    assert p.returncode == 1
    line = one_error_line(p.stderr)
    assert "'learning_rat'" in line and "learning_rate" in line


@pytest.mark.slow
@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_cli_wrong_type(value):
    p = run_raw([f"--batch_size={value}"])
    assert p.returncode == 1
    line = one_error_line(p.stderr)
    assert "batch_size" in line and value in line and "int" in line


@pytest.mark.slow
def test_cli_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.py")
    p = run_raw([missing, "--batch_size=4"])
    assert p.returncode == 1
    assert missing in one_error_line(p.stderr)


def test_help_lists_every_setting_with_its_default_and_comment(capsys):
    defaults = {k: getattr(train, k) for k in train.SETTINGS}
    with pytest.raises(SystemExit) as e:
        configurator.configure(defaults, ["--help"], TRAIN)
    assert e.value.code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")]
    assert len(lines) == len(train.SETTINGS)
    assert all(len(line.split("  ")[-1].strip()) > 3 for line in lines), "every setting has a comment"
    by_key = {line.split("=", 1)[0].strip(): line for line in lines}
    assert by_key["--learning_rate"].split() == ["--learning_rate=0.0006", "peak", "learning", "rate", "of", "AdamW"]
    assert by_key["--init_from"].startswith("  --init_from='scratch'")


def test_every_setting_has_a_rule():
    assert set(train.RULES) == set(train.SETTINGS)
    defaults = {k: getattr(train, k) for k in train.SETTINGS}
    configurator.check_settings(defaults, train.RULES, TRAIN)  # the defaults are valid
    with pytest.raises(KeyError, match="no rule"):
        configurator.check_settings({**defaults, "new_setting": 1}, train.RULES, TRAIN)


@pytest.mark.parametrize("key, value", [
    ("lr_schedule", "bogus"), ("optimizer", "sgd"), ("decay_frac", -0.1), ("decay_frac", 0.0),
    ("max_iters", -1), ("eval_interval", 0), ("log_interval", 0), ("ckpt_interval", -1),
    ("batch_size", 0), ("device", "cuda:x"), ("dtype", "fp8"), ("sampling", "shuffle"),
    ("init_from", "gpt3"), ("compile", "yes"), ("gradient_accumulation_steps", 0)])
def test_bad_setting_is_refused_by_its_rule(key, value):
    settings = {**{k: getattr(train, k) for k in train.SETTINGS}, key: value}
    with pytest.raises(configurator.ConfigError, match=f"^{key}={value!r} is not valid: it must be"):
        configurator.check_settings(settings, train.RULES, TRAIN)


@pytest.mark.parametrize("key, value", [
    ("dropout", 1.0), ("mlp", "geglu"), ("n_layer", 0), ("block_size", 0), ("vocab_size", -1), ("pos_emb", "alibi"),
    ("rope_theta", 0.0), ("logit_softcap", -1.0), ("n_kv_head", 5)])
def test_bad_model_setting_is_refused_by_gptconfig(key, value):
    """The model settings are checked once, by GPTConfig (train.RULES defers to it)."""
    assert train.MODEL_KEYS == [k for k in GPTConfig.field_names() if k in train.SETTINGS]
    settings = {**{k: getattr(train, k) for k in train.SETTINGS}, key: value}
    configurator.check_settings(settings, train.RULES, TRAIN)
    with pytest.raises(configurator.ConfigError, match=f"{key}={value!r}"):
        train.check_model_settings(settings)


@pytest.mark.parametrize("override", ["--lr_schedule=bogus", "--n_embd=100"])
def test_cli_bad_setting_stops_before_anything_is_written(tmp_path, override):
    out = tmp_path / "out"
    p = run_raw([f"--out_dir={out}", "--device=cpu", override])
    assert p.returncode == 1
    assert override[2:].split("=")[0] in one_error_line(p.stderr)
    assert not out.exists()


# -----------------------------------------------------------------------------
# the training loop


def test_loss_falls(tmp_path, char_data):
    out = str(tmp_path / "out")
    run_train(out, char_data, max_iters=30, learning_rate=1e-2, min_lr=1e-3, warmup_iters=0,
              lr_decay_iters=30)
    losses = step_losses(read_metrics(out))
    assert sorted(losses) == list(range(30))
    vocab_size = load_meta(char_data)["vocab_size"]
    assert losses[0] == pytest.approx(math.log(vocab_size), abs=0.3), "starts near uniform over the vocabulary"
    assert losses[29] < losses[0] - 0.5, losses
    evals = eval_losses(read_metrics(out))
    assert evals[30][1] < evals[0][1] - 0.5, evals


@pytest.mark.slow
def test_logged_loss_is_mean_over_micro_steps(tmp_path, char_data):
    """With lr 0, AdamW leaves the weights as initialised, so ckpt.pt at iter 1 holds the
    weights of step 0; the loss logged for step 0 is the mean of its 3 micro-batch losses."""
    out = str(tmp_path / "out")
    run_train(out, char_data, gradient_accumulation_steps=3, learning_rate=0, min_lr=0,
              warmup_iters=0, max_iters=1, seed=7)
    logged = step_losses(read_metrics(out))[0]
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == 1
    model = checkpoint.build_model(ckpt, "ckpt.pt")
    model.eval()
    data = TokenFile(os.path.join(char_data, "train.bin"), np.uint16)
    with torch.no_grad():
        micro = [model(*get_batch(data, 32, 8, 7, 0, j))[1].item() for j in range(3)]
    data.close()
    assert len(set(micro)) == 3
    assert logged == pytest.approx(sum(micro) / 3, rel=1e-5), (logged, micro)
    assert logged != pytest.approx(micro[-1], rel=1e-4), "logged the last micro-step only"


# -----------------------------------------------------------------------------
# a run with always_save_checkpoint=False, shared by the checkpoint tests below


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, char_data):
    out = str(tmp_path_factory.mktemp("best") / "out")
    run_train(out, char_data, max_iters=12, eval_interval=3, learning_rate=1e-2,
              warmup_iters=0, lr_decay_iters=12, always_save_checkpoint=False)
    return out


def test_best_checkpoint(best_run):
    evals = eval_losses(read_metrics(best_run))
    assert sorted(evals) == [0, 3, 6, 9, 12]
    best = torch.load(os.path.join(best_run, "best.pt"), map_location="cpu", weights_only=True)
    # best.pt is written on improvement after the first step, so it is the min of evals 3..12
    best_iter = min((it for it in evals if it > 0), key=lambda it: evals[it][1])
    assert best["iter_num"] == best_iter
    assert best["best_val_loss"] == pytest.approx(min(v for _, v in evals.values()), rel=1e-6)
    assert best["best_val_loss"] == pytest.approx(evals[best_iter][1], rel=1e-6)
    ckpt = torch.load(os.path.join(best_run, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == 12
    # best.pt's weights are the ones that scored best_val_loss: re-evaluate them
    model = checkpoint.build_model(best, "best.pt")
    splits, _ = open_dataset(best["config"]["data_dir"], 32)
    val = estimate_loss(model, {"val": splits["val"]}, 32, 8, 4, nullcontext(), "cpu")["val_loss"]
    assert val == pytest.approx(best["best_val_loss"], rel=1e-5)


def test_checkpoint_keys(best_run):
    ckpt = torch.load(os.path.join(best_run, "ckpt.pt"), map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config",
                "scaler", "rng", "sampler"):
        assert key in ckpt, key
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["model_args"]["n_layer"] == 2
    assert ckpt["model_args"]["vocab_size"] == load_meta(ckpt["config"]["data_dir"])["vocab_size"]
    assert ckpt["config"]["max_iters"] == 12 and ckpt["config"]["always_save_checkpoint"] is False
    evals = eval_losses(read_metrics(best_run))
    assert ckpt["best_val_loss"] == pytest.approx(min(v for _, v in evals.values()), rel=1e-6)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
def test_eval_only(tmp_path, best_run, char_data):
    """eval_only on the checkpoint: one evaluation equal to the training run's own eval at that
    iteration (same fixed eval batches), no checkpoint written. --learning_rate=1 (an int where
    a float is expected) is accepted."""
    out = str(tmp_path / "out")
    shutil.copytree(best_run, out)
    before = {name: open(os.path.join(out, name), "rb").read() for name in ("ckpt.pt", "best.pt")}
    reference = next(r for r in read_metrics(out) if r["iter"] == 12 and "val_loss" in r)
    p = run_train(out, char_data, "--eval_only=True", "--learning_rate=1", init_from="resume",
                  max_iters=12, learning_rate=None)
    assert "step 12" in p.stdout
    after = read_metrics(out)
    assert [r for r in after if r["iter"] >= 12] == [{k: pytest.approx(v, rel=1e-6) for k, v in reference.items()}]
    for name, data in before.items():
        assert open(os.path.join(out, name), "rb").read() == data, f"eval_only rewrote {name}"
    assert sorted(os.listdir(out)) == [".lock", "best.pt", "ckpt.pt", "metrics.jsonl"]


# a few training steps of a small model; prints the page faults of the last 10
PAGE_FAULTS = """
import resource, sys, torch
from gpt_trainer.runtime import keep_freed_memory
from model import GPT, GPTConfig
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=64, vocab_size=65))
opt = torch.optim.AdamW(model.parameters())
x = torch.randint(0, 65, (32, 64))
for i in range(13):
    if i == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_between_steps():
    # glibc adapts its mmap threshold to the blocks freed so far, so without a fixed one the
    # baseline's faults depend on the heap's layout (1 to 48k here with aten's fp32 matmuls);
    # its documented default threshold, fixed, makes it the same every run
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    faults = {}
    for mode in ("default", "keep"):
        p = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], cwd=REPO, capture_output=True,
                           text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        faults[mode] = int(p.stdout.split()[-1])
    assert faults["keep"] * 3 < faults["default"], faults


@pytest.mark.slow
def test_compile_on_cpu_trains_like_eager(tmp_path, char_data):
    """compile=True compiles (no fallback to eager) and gives eager's losses to rounding; the
    checkpoint has the plain parameter names."""
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    run_train(eager, char_data, max_iters=4)
    p = run_train(compiled, char_data, max_iters=4, compile=True, timeout=600)
    assert "torch.compile failed" not in p.stderr, p.stderr[-3000:]
    a, b = step_losses(read_metrics(eager)), step_losses(read_metrics(compiled))
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert all(abs(a[i] - b[i]) < 1e-4 for i in a), (a, b)
    ckpt = torch.load(os.path.join(compiled, "ckpt.pt"), weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


@pytest.mark.slow
def test_resume_from_compiled_style_prefixes(tmp_path, best_run, char_data):
    """A nanoGPT checkpoint of a compiled model has '_orig_mod.' keys; it resumes."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    ckpt = torch.load(os.path.join(best_run, "ckpt.pt"), map_location="cpu", weights_only=True)
    plain = ckpt["model"]
    ckpt["model"] = {"_orig_mod." + k: v for k, v in plain.items()}
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    assert set(checkpoint.strip_prefixes(ckpt["model"])) == set(plain)
    run_train(out, char_data, init_from="resume", max_iters=13, learning_rate=1e-2, warmup_iters=0,
              lr_decay_iters=12, eval_interval=3)
    assert sorted(step_losses(read_metrics(out))) == [12]
    resumed = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert resumed["iter_num"] == 13
    assert set(resumed["model"]) == set(plain)
    # eval at iter 12 on the loaded weights equals the original run's eval at 12
    assert eval_losses(read_metrics(out))[12] == pytest.approx(eval_losses(read_metrics(best_run))[12], rel=1e-6)


@pytest.mark.slow
def test_init_from_auto(tmp_path, char_data):
    out = str(tmp_path / "out")
    p = run_train(out, char_data, init_from="auto", max_iters=4, eval_interval=2)
    assert "starting from scratch" in p.stdout
    first = step_losses(read_metrics(out))
    assert sorted(first) == [0, 1, 2, 3]
    p = run_train(out, char_data, init_from="auto", max_iters=6, eval_interval=2)
    assert "resuming" in p.stdout
    losses = step_losses(read_metrics(out))
    assert sorted(losses) == [0, 1, 2, 3, 4, 5]
    assert {k: losses[k] for k in first} == first
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 6


# -----------------------------------------------------------------------------
# bad checkpoints: one line naming the file, nothing executed


def resume_error(out, char_data, **overrides):
    p = run_train(out, char_data, init_from="resume", check=False, **overrides)
    assert p.returncode == 1, p.stdout + p.stderr
    return one_error_line(p.stderr)


@pytest.mark.slow
def test_truncated_checkpoint(tmp_path, best_run, char_data):
    out = str(tmp_path / "out")
    os.makedirs(out)
    data = open(os.path.join(best_run, "ckpt.pt"), "rb").read()
    path = os.path.join(out, "ckpt.pt")
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    assert path in resume_error(out, char_data, max_iters=20)


@pytest.mark.slow
def test_foreign_checkpoint(tmp_path, char_data):
    out = str(tmp_path / "out")
    os.makedirs(out)
    path = os.path.join(out, "ckpt.pt")
    torch.save({"foo": 1}, path)
    line = resume_error(out, char_data, max_iters=20)
    assert path in line and "not a checkpoint" in line


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        # unpickling this would create the marker file
        return (os.makedirs, (self.marker,))


@pytest.mark.slow
def test_checkpoint_with_code_is_refused(tmp_path, char_data):
    out = str(tmp_path / "out")
    os.makedirs(out)
    path = os.path.join(out, "ckpt.pt")
    marker = str(tmp_path / "pwned")
    torch.save({"model": {}, "model_args": {}, "payload": Payload(marker)}, path)
    line = resume_error(out, char_data, max_iters=20)
    assert path in line
    assert not os.path.exists(marker), "loading the checkpoint ran code from it"
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_checkpoint(path)
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_model_args_mismatch(tmp_path, best_run, char_data):
    out = str(tmp_path / "out")
    shutil.copytree(best_run, out)
    line = resume_error(out, char_data, max_iters=20, n_layer=3)
    assert f"n_layer=3 but the model in {os.path.join(out, 'ckpt.pt')} has n_layer=2" in line


def test_resume_alone_continues_the_run(tmp_path, best_run):
    """--init_from=resume --out_dir alone: the model, the data and the settings are the
    checkpoint's (nanoGPT's block_size=1024 default no longer gets in the way); an override is
    applied and said."""
    out = str(tmp_path / "out")
    shutil.copytree(best_run, out)
    before = load_ckpt(out)
    p = run_raw(["--init_from=resume", f"--out_dir={out}", "--max_iters=14", "--lr_decay_iters=14"])
    assert p.returncode == 0, p.stderr
    assert "resume: max_iters=14 (the checkpoint's run had 12)" in p.stdout
    assert "resume: lr_decay_iters=14 (the checkpoint's run had 12)" in p.stdout
    after = load_ckpt(out)
    assert after["iter_num"] == 14 and after["gpt_config"] == before["gpt_config"]
    changed = {k for k in before["config"] if before["config"][k] != after["config"][k]}
    # this launch's: the overrides, where it runs; vocab_size=0 ("the dataset's") is now the model's 65
    assert changed == {"max_iters", "lr_decay_iters", "init_from", "device", "compile", "out_dir", "vocab_size"}
    assert after["config"]["vocab_size"] == after["model_args"]["vocab_size"]


# -----------------------------------------------------------------------------
# bad data: one line naming the file or directory


def test_missing_data_dir(tmp_path):
    missing = str(tmp_path / "nodata")
    p = run_train(str(tmp_path / "out"), missing, check=False)
    assert p.returncode == 1
    assert missing in one_error_line(p.stderr)


@pytest.mark.slow
def test_val_shorter_than_block(tmp_path, char_data):
    data = str(tmp_path / "data")
    shutil.copytree(char_data, data)
    np.fromfile(os.path.join(data, "val.bin"), dtype=np.uint16)[:32].tofile(os.path.join(data, "val.bin"))
    p = run_train(str(tmp_path / "out"), data, check=False)
    assert p.returncode == 1
    line = one_error_line(p.stderr)
    assert os.path.join(data, "val.bin") in line and "block_size" in line


@pytest.mark.slow
def test_token_id_out_of_range(tmp_path):
    data = write_char_dataset(str(tmp_path / "data"), "abcdefgh" * 200)
    ids = np.fromfile(os.path.join(data, "train.bin"), dtype=np.uint16)
    ids[100] = 8  # vocab_size is 8
    ids.tofile(os.path.join(data, "train.bin"))
    p = run_train(str(tmp_path / "out"), data, check=False)
    assert p.returncode == 1
    line = one_error_line(p.stderr)
    assert os.path.join(data, "train.bin") in line and "8" in line


# -----------------------------------------------------------------------------
# wandb


@pytest.mark.slow
def test_wandb_offline(tmp_path, char_data):
    from trainutil import child_env
    wandb_dir = str(tmp_path / "wandb")
    os.makedirs(wandb_dir)
    env = child_env(WANDB_MODE="offline", WANDB_DIR=wandb_dir, WANDB_SILENT="true",
                    WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"))
    out = str(tmp_path / "out")
    run_train(out, char_data, wandb_log=True, max_iters=3, eval_interval=2, env=env, timeout=240)
    runs = [d for d in os.listdir(os.path.join(wandb_dir, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1, os.listdir(os.path.join(wandb_dir, "wandb"))
    run_dir = os.path.join(wandb_dir, "wandb", runs[0])
    assert any(f.endswith(".wandb") for f in os.listdir(run_dir))
    assert sorted(step_losses(read_metrics(out))) == [0, 1, 2], "metrics.jsonl is written as well"


def test_wandb_not_logged_in_is_one_line_before_the_first_step(tmp_path, char_data):
    """wandb_log=True online with no API key (and no terminal to ask for one): one line that
    names the ways on, not wandb's traceback."""
    from trainutil import child_env, one_error_line
    env = child_env(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
                    WANDB_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"))
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        env.pop(key, None)
    out = str(tmp_path / "out")
    p = run_train(out, char_data, wandb_log=True, max_iters=2, env=env, check=False, timeout=240)
    assert p.returncode == 1 and "iter 0" not in p.stdout
    line = one_error_line(p.stderr)
    assert line.startswith("error: wandb_log=True but wandb could not start a run (") and "`wandb login`" in line
    assert "WANDB_MODE=offline" in line


@pytest.mark.parametrize("config_file", ["train_shakespeare_char.py", "speedrun_shakespeare_char_cpu.py",
                                         "train_llama_shakespeare.py", "train_gpt2.py"])
@pytest.mark.slow
def test_config_files_train(config_file, char_data, tmp_path):
    """Each training config's own model and optimizer settings run two steps (data, batch and
    length shrunk so that even GPT-2 124M takes seconds)."""
    out_dir = str(tmp_path / "out")
    p = run_raw([f"config/{config_file}", f"--data_dir={char_data}", f"--out_dir={out_dir}",
                 "--device=cpu", "--compile=False", "--wandb_log=False", "--batch_size=2",
                 "--block_size=32", "--gradient_accumulation_steps=1", "--max_iters=2",
                 "--lr_decay_iters=2", "--warmup_iters=1", "--eval_iters=1", "--log_interval=1"],
                timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(out_dir) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
