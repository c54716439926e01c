"""
The settings of a resumed run, as nanoGPT users expect: `python train.py --init_from=resume
--out_dir=X` alone continues X's run. The model's shape, the dataset and the training settings
come from the checkpoint (its saved `config` and model); what this launch gives (a config file
or --key=value) overrides them, each change said in one line; a change of the model's shape
or vocabulary is a one-line error naming both values. Settings of the launch rather than of
the run (PER_LAUNCH: the machine, out_dir, init_from, ...) are never taken from the checkpoint.
"""
import os

import torch

from configurator import type_ok
from gpt_trainer import nanogpt
from gpt_trainer.checkpoint import load_sharded_state, sharded_dir
from gpt_trainer.errors import ConfigError

# where and how this launch runs, not what it trains: always this launch's values (a nanoGPT
# checkpoint from a GPU says device='cuda', compile=True)
PER_LAUNCH = ("out_dir", "init_from", "overwrite", "eval_only", "device", "dtype", "compile", "backend",
              "ddp_timeout", "fsdp")


def saved_run(out_dir, fsdp=False):
    """(path, the settings of the run that wrote out_dir's resume point, its GPTConfig fields),
    or None when there is no readable one (load_resume_point then says why)."""
    try:
        if fsdp:
            if sharded_dir(out_dir) is None:
                return None
            path, ckpt = os.path.join(out_dir, "ckpt_dcp"), load_sharded_state(out_dir)
        else:
            path = os.path.join(out_dir, "ckpt.pt")
            if not os.path.exists(path):
                return None
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # weights stay on disk
        it = ckpt.get("iter_num")
        if not isinstance(ckpt.get("model_args"), dict) or not isinstance(it, int) or isinstance(it, bool) \
                or not (fsdp or "optimizer" in ckpt):
            return None  # not a resume point: load_resume_point says so, before any setting is checked
        weights = [t for t in (ckpt.get("model") or {}).values() if torch.is_tensor(t) and t.is_floating_point()]
        if not all(torch.isfinite(t).all() for t in weights):
            return None  # likewise (NaN/inf weights); one read of the mapped file, only on resume
    except Exception:
        return None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return path, config, nanogpt.config_fields(ckpt)


def resume_settings(defaults, settings, given, saved, model_keys):
    """(settings, notes): the saved run's settings with this launch's `given` ones applied.
    defaults: train.py's; settings: after this launch's config files and overrides; given: the
    keys those assigned; saved: saved_run(); model_keys: the settings that are GPTConfig fields."""
    path, config, fields = saved
    run = dict(defaults)
    run.update({k: v for k, v in config.items() if k in defaults and type_ok(defaults[k], v)})
    run.update({k: fields[k] for k in model_keys if k in fields})
    run.update({k: settings[k] for k in PER_LAUNCH})
    notes = []
    for key in [k for k in defaults if k in given and k not in PER_LAUNCH]:
        if settings[key] == run[key]:
            continue
        if key in model_keys and key != "dropout":
            raise ConfigError(f"{key}={settings[key]!r} but the model in {path} has {key}={run[key]!r}, "
                              f"which a resumed run cannot change; drop {key} or start a new --out_dir")
        notes.append(f"resume: {key}={settings[key]!r} (the checkpoint's run had {run[key]!r})")
        run[key] = settings[key]
    return run, notes
