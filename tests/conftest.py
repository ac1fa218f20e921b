import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton
# is first imported, so set it here, ahead of any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """ATOD_FAST_CACHE pointed at a fresh folder for one test module (its built-in teachers are made there and
    subprocesses inherit it), restored afterwards."""
    old = os.environ.get("ATOD_FAST_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["ATOD_FAST_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["ATOD_FAST_CACHE"]
    else:
        os.environ["ATOD_FAST_CACHE"] = old


@pytest.fixture(scope="module")
def tok_and_lm():
    """A tiny Llama and a tokenizer fitted to guess_number's text (rollout tests)."""
    from atod_fast.envs import make
    from atod_fast.trainer.config import TinyArch
    from atod_fast.trainer.models import build_tokenizer, tiny_llama

    env = make("guess_number")
    corpus = [env.reset(s) for s in range(20)] + ["Higher.", "Lower.", "Correct, it was 7."] * 20
    tok = build_tokenizer(corpus, 300)
    lm = tiny_llama(TinyArch(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok, seed=0)
    return tok, lm


@pytest.fixture(scope="module")
def tiny_run(private_cache):
    """Overrides for the smallest end-to-end ``atod-fast train`` run; the built-in teacher they name is made once
    per module, in a private cache that subprocesses inherit."""
    from atod_fast.trainer.config import load_train_config
    from atod_fast.trainer.loop import teacher_location

    overrides = [
        "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32",
        "sft.arch.intermediate_size=64", "sft.arch.num_heads=2", "model.student_arch.hidden_size=32",
        "model.student_arch.intermediate_size=64", "model.student_arch.num_heads=2", "rollout.episodes_per_step=6",
        "eval.episodes=8", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=1",
        "eval.at_end=false",
    ]
    teacher_location(load_train_config(None, overrides), progress=False)
    yield overrides
