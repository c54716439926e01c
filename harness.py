"""
lm-evaluation-harness's own command line (`lm_eval`), with our model registered as
'gpt-trainer': everything after `harness.py` is lm_eval's.

    python harness.py run --model gpt-trainer --model_args path=out-shakespeare-char --tasks arc_easy --device cpu
    python harness.py ls tasks

model_args: path (an out_dir, whose best.pt or else ckpt.pt is read; a checkpoint file of ours or
nanoGPT's; a Hugging Face GPT-2, Llama or Qwen3 directory; a GPT-2 name), batch_size, dtype,
max_gen_toks, seed. evaluate.py --tasks=lm_eval:... runs the same scoring (gpt_trainer/harness.py).
"""
import os
import sys

from lm_eval.api.registry import register_model

from gpt_trainer.errors import UserError, install_error_hook
from gpt_trainer.harness import GPTLM
from gpt_trainer.loading import load_model
from gpt_trainer.runtime import resolve_device


@register_model("gpt-trainer")
class CheckpointLM(GPTLM):
    """GPTLM of the model at `path`, on `device`."""

    def __init__(self, path=None, device="auto", max_batch_size=None, **kwargs):
        if path is None:
            raise UserError("the gpt-trainer model needs path=OUT_DIR, a checkpoint file, an HF directory "
                            "or a GPT-2 name (--model_args path=...)")
        unknown = set(kwargs) - {"batch_size", "dtype", "max_gen_toks", "seed"}
        if unknown:  # a misspelt --model_args key would otherwise be ignored
            raise UserError(f"gpt-trainer: unknown model argument(s) {', '.join(sorted(unknown))}; it takes path, "
                            f"batch_size, device, dtype, max_gen_toks and seed")
        path = str(path)
        if os.path.isfile(path):
            model, tok = load_model("resume", os.path.dirname(path), path)[:2]
        elif os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            model, tok = load_model("resume", path, "auto")[:2]
        else:
            model, tok = load_model(path, "", "auto")[:2]
        super().__init__(model.to(resolve_device(device or "auto")), tok, **kwargs)


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate
    install_error_hook()
    sys.argv[0] = "harness.py"
    cli_evaluate()
