import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton
# is first imported, so set it here, ahead of any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
