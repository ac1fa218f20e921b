"""Per-step metrics: ``metrics.jsonl`` in the run directory and TensorBoard events of the same."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("atod_fast")

# The keys every line of metrics.jsonl carries.
REQUIRED_KEYS = ("step", "loss", "distill", "pg", "value_loss", "kl", "entropy", "clipfrac", "lambda_mean",
                 "reward_mean", "success_rate", "tokens_per_s", "rollout_s", "update_s")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends one JSON object per step; on resume, drops the lines after the resumed step."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self._f = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("TensorBoard events are off: the tensorboard package is not installed "
                            "(pip install 'atod-fast[viz]', or set logging.tensorboard=false)")
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, metrics: dict) -> None:
        self._f.write(json.dumps(metrics) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = metrics["step"]
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, list):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{k}/{i}", x, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
