"""Per-step metrics: ``metrics.jsonl`` in the run directory (always), TensorBoard events and Weights & Biases.

Each destination is a sink with ``write(metrics)`` and ``close()``; :class:`MetricsWriter` hands one
step's metrics to every sink. On resume, each sink forgets the steps after the resumed one, as far as
it can: ``metrics.jsonl`` drops those lines, TensorBoard purges them (``purge_step``), and W&B
continues the same run (its id is kept in ``RUN/wandb_run_id``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError

log = logging.getLogger("atod_fast")

# The keys every line of metrics.jsonl carries.
REQUIRED_KEYS = ("step", "loss", "distill", "pg", "value_loss", "kl", "entropy", "clipfrac", "lambda_mean",
                 "reward_mean", "success_rate", "tokens_per_s", "rollout_s", "update_s")
WANDB_ID_FILE = "wandb_run_id"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scalars(metrics: dict) -> dict[str, float]:
    """The plottable part of a step's metrics: finite numbers, and lists as ``key/i`` (λ per turn)."""
    out = {}
    for k, v in metrics.items():
        if k != "step" and _finite(v):
            out[k] = v
        elif isinstance(v, list):
            out.update({f"{k}/{i}": x for i, x in enumerate(v) if _finite(x)})  # a turn without tokens: None
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class JsonlSink:
    """Appends one JSON object per step; on resume, drops the lines after the resumed step."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self._f = self.path.open("a")

    def write(self, metrics: dict) -> None:
        self._f.write(json.dumps(metrics) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    """Event files under ``RUN/tensorboard``; events after the resumed step are purged."""

    def __init__(self, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, metrics: dict) -> None:
        for k, v in scalars(metrics).items():
            self._tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        self._tb.close()


class WandbSink:
    """A Weights & Biases run; its files go under ``RUN/wandb`` (all of them, with ``WANDB_MODE=offline``).

    A resumed run continues the W&B run of the same id. W&B's history only grows: steps logged after
    the checkpoint by the interrupted process stay there, and the server ignores their second logging.
    """

    def __init__(self, run_dir: Path, *, project: str, run_name: str | None, config: dict | None, resume_step: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging.wandb: the wandb package is not installed (pip install 'atod-fast[wandb]', "
                              "or set logging.wandb=false)") from None
        id_file = run_dir / WANDB_ID_FILE
        resuming = resume_step > 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resuming else None  # None: W&B makes one
        try:  # console="off": W&B would otherwise wrap this process's stdout and stderr
            self._run = wandb.init(project=project, name=run_name or run_dir.resolve().name, id=run_id,
                                   resume="allow" if resuming else None, dir=str(run_dir), config=config,
                                   settings=wandb.Settings(console="off", silent=True))
        except wandb.errors.Error as e:
            raise ConfigError(f"logging.wandb: W&B could not start a run: {str(e).splitlines()[0]} (log in with "
                              "`wandb login`, or set WANDB_MODE=offline to keep the run local)") from None
        if not resuming:
            id_file.write_text(self._run.id + "\n")

    def write(self, metrics: dict) -> None:
        self._run.log(scalars(metrics), step=metrics["step"])

    def close(self) -> None:
        self._run.finish()


def _plain_config(config: Any) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    if is_dataclass(config):
        return asdict(config)
    raise TypeError(f"run_config: expected a dataclass or a dict, got {type(config).__name__}")


class MetricsWriter:
    """One step's metrics to every sink: metrics.jsonl always, TensorBoard and W&B when asked for.

    Args:
        tensorboard: also write TensorBoard events (skipped, with a warning, without the tensorboard package).
        resume_step: the step the run resumes from (0: a fresh run).
        wandb: the run's ``LoggingConfig``; its ``wandb`` field turns the W&B sink on.
        run_config: the run's config (a dataclass or a dict), recorded as the W&B run's config.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int = 0, wandb=None,
                 run_config: Any = None):
        self.path = run_dir / "metrics.jsonl"
        self.sinks: list = []
        if wandb is not None and wandb.wandb:  # first: the one that can refuse to start
            self.sinks.append(WandbSink(run_dir, project=wandb.wandb_project, run_name=wandb.wandb_run_name,
                                        config=_plain_config(run_config), resume_step=resume_step))
        if tensorboard:
            try:
                self.sinks.insert(0, TensorBoardSink(run_dir, resume_step))
            except ImportError:
                log.warning("TensorBoard events are off: the tensorboard package is not installed "
                            "(pip install 'atod-fast[viz]', or set logging.tensorboard=false)")
        self.sinks.insert(0, JsonlSink(run_dir, resume_step))

    def write(self, metrics: dict) -> None:
        for sink in self.sinks:
            sink.write(metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
