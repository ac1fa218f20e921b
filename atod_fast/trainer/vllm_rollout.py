"""vLLM generation for rollouts (``rollout.engine=vllm``), with the student's weights synced after every update.

Every rank runs one ``vllm.LLM`` inside its own training process, on its own GPU, beside the
student (tensor_parallel_size=1). The engine serves :func:`atod_fast.trainer.rollout.play` through
:meth:`VllmGenerator.generate`: prompts go in as token ids (never re-tokenized), every request
has its own seed, and the sampled ids come back in the layout the HF path gives, so
trajectories look the same whichever engine sampled them. No log-probs are asked for: the
PPO denominators are recomputed by the student over the packed episodes (``Trainer.prepare``).

vLLM API this module relies on (vLLM's offline ``LLM`` class and its RLHF examples and docs):

- ``LLM(model, tensor_parallel_size=1, distributed_executor_backend="external_launcher",
  worker_extension_cls="<module>.<Class>", load_format="dummy", ...)``: the external-launcher
  executor keeps the engine in this process (torchrun-style ``RANK``/``LOCAL_RANK``/``MASTER_*``
  environment, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one engine per rank; the worker extension
  class is mixed into vLLM's worker; ``load_format="dummy"`` skips reading weights from disk
  because the first sync writes the student's.
- ``LLM.collective_rpc(method, args=...)`` calls the extension's method on the worker; with the
  in-process executor the arguments are passed as they are (CUDA tensors by reference), and the
  method hands them to ``self.model_runner.model.load_weights(weights)``, which takes
  ``(name, tensor)`` pairs under the HF checkpoint names and returns the vLLM names it loaded.
- ``LLM.reset_prefix_cache()`` after every weight update: cached prefixes hold keys and values
  of the old weights.
- ``LLM.generate(prompts, sampling_params, use_tqdm=False)`` with ``{"prompt_token_ids": ids}``
  prompts (``TokensPrompt``) and one ``SamplingParams(temperature, max_tokens, stop_token_ids,
  seed, detokenize=False)`` per prompt; ``outputs[0].token_ids`` (ending with the stop id when
  one was sampled).

Sleep mode is not used: level-2 sleep is reported to corrupt weights on wake-up
(vllm-project/vllm#29341), so vLLM keeps its weights and KV cache (``rollout.vllm_gpu_memory_
utilization`` of the GPU) for the whole run.

Status: tested against a stand-in of this API surface (``tests/test_vllm_rollout.py``) only;
it has not run against a real vLLM, which needs a CUDA machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import torch

from .config import ConfigError
from .distributed import standalone_env

log = logging.getLogger("atod_fast")

EXTENSION = f"{__name__}.WeightSyncExtension"


def check_available(device: torch.device) -> None:
    """ConfigError unless vLLM can be imported and this rank generates on CUDA."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError("rollout.engine: vllm is not installed; install it on a CUDA machine (pip install vllm) "
                          "or use rollout.engine=hf") from None
    if device.type != "cuda":
        raise ConfigError(f"rollout.engine: vLLM generates on CUDA GPUs only, and this run's device is {device}; "
                          "use rollout.engine=hf (or device=cuda on a GPU machine)")


def request_seed(base_seed: int, episode_seed: int, turn: int) -> int:
    """Sampling seed of one request: distinct per (step, episode, turn), the same on every replay."""
    return (base_seed * 1_000_003 + episode_seed * 7_919 + turn * 104_729) % (1 << 62)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); ``collective_rpc`` calls these methods."""

    def atod_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> list[str] | None:
        """Writes ``(HF name, tensor)`` pairs into the worker's model; the vLLM names it loaded, if it says."""
        loaded = self.model_runner.model.load_weights(weights)
        return None if loaded is None else sorted(loaded)

    def atod_param_names(self) -> list[str]:
        return sorted(n for n, _ in self.model_runner.model.named_parameters())


def export_config(lm, tokenizer) -> tempfile.TemporaryDirectory:
    """A folder with the student's config, generation config and tokenizer (no weights: the first sync writes
    them), for a student that exists only in memory (the built-in one)."""
    folder = tempfile.TemporaryDirectory(prefix="atod-vllm-")
    lm.config.save_pretrained(folder.name)
    lm.generation_config.save_pretrained(folder.name)
    tokenizer.save_pretrained(folder.name)
    return folder


class VllmGenerator:
    """A colocated vLLM engine that generates the agent's turns and takes the student's weights after updates."""

    def __init__(self, llm, sampling_params_cls, *, keep_alive=None):
        self.llm = llm
        self._params = sampling_params_cls
        self._keep_alive = keep_alive  # e.g. the exported config folder, alive as long as the engine
        self._checked_coverage = False

    @classmethod
    def create(cls, *, model: str, dtype: str, gpu_memory_utilization: float, max_model_len: int, seed: int,
               trust_remote_code: bool = False, keep_alive=None) -> VllmGenerator:
        import vllm

        # In-process engine: collective_rpc then hands the student's CUDA tensors over without serializing.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        standalone_env()  # the external-launcher executor reads the torchrun environment
        llm = vllm.LLM(
            model=model, tensor_parallel_size=1, distributed_executor_backend="external_launcher",
            worker_extension_cls=EXTENSION, load_format="dummy", dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
            trust_remote_code=trust_remote_code,
        )
        return cls(llm, vllm.SamplingParams, keep_alive=keep_alive)

    def generate(self, prompts: Sequence[Sequence[int]], *, episode_seeds: Sequence[int], turn: int,
                 stop_ids: Sequence[int], max_new_tokens: int, temperature: float,
                 base_seed: int) -> list[list[int]]:
        """One agent turn for every prompt (the ``generate`` contract of :func:`atod_fast.trainer.rollout.play`)."""
        params = [self._params(temperature=temperature, max_tokens=max_new_tokens, stop_token_ids=list(stop_ids),
                               seed=request_seed(base_seed, s, turn), detokenize=False)
                  for s in episode_seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [[int(t) for t in out.outputs[0].token_ids] for out in outputs]

    @torch.no_grad()
    def sync_weights(self, named_params: Iterable[tuple[str, torch.Tensor]],
                     gathered: Callable[[list], contextlib.AbstractContextManager] | None = None) -> list[str]:
        """Writes the student's parameters into the engine and drops its prefix cache; returns the names sent.

        ``named_params``: the student LM's ``named_parameters()`` (HF names; the value head is not part of
        the LM). ``gathered``: for parameters sharded by ZeRO-3, a context that materializes the given
        parameters (a collective: every rank syncs the same parameters in the same order); each one is
        sent while gathered.
        """
        names, loaded = [], set()
        if gathered is None:
            batch = [(n, p.detach()) for n, p in named_params]
            names = [n for n, _ in batch]
            loaded.update(self._load(batch))
        else:
            for n, p in named_params:
                with gathered([p]):
                    loaded.update(self._load([(n, p.detach())]))
                names.append(n)
        self.llm.reset_prefix_cache()
        if not self._checked_coverage:
            self._checked_coverage = True
            if loaded:
                missing = sorted(set(self.llm.collective_rpc("atod_param_names")[0]) - loaded)
                if missing:  # dummy-initialized weights the sync never writes would make rollouts garbage
                    log.warning("rollout.engine=vllm: %d vLLM parameters are not written by the weight sync "
                                "(first: %s); rollouts would use their dummy initialization", len(missing),
                                ", ".join(missing[:5]))
        return names

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        (res,) = self.llm.collective_rpc("atod_load_weights", args=(weights,))
        return set(res or ())
