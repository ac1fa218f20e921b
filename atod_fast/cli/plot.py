"""``atod-fast plot RUN_DIR``: PNG curves from a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from ..trainer.metrics import read_metrics


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write success.png, reward.png, lambda_by_turn.png and losses.png; returns their paths."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'atod-fast[viz]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"run_dir: no metrics.jsonl with any step in {run_dir}")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    for key, title in (("success_rate", "success rate (training episodes)"), ("reward_mean", "mean episode reward")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, lw=0.8, alpha=0.4, label="per step")
        k = max(1, len(ys) // 20)
        if len(ys) > k:
            smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=1.8, label=f"moving mean ({k} steps)")
        ax.set(xlabel="step", title=title)
        ax.legend()
        save(fig, f"{key.split('_')[0]}.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    turns = max((len(r.get("lambda_turn", [])) for r in rows), default=0)
    for tau in range(turns):
        xs = [r["step"] for r in rows if len(r.get("lambda_turn", [])) > tau]
        ys = [r["lambda_turn"][tau] for r in rows if len(r.get("lambda_turn", [])) > tau]
        ax.plot(xs, ys, label=f"turn {tau}")
    ax.set(xlabel="step", ylabel="λ", ylim=(-0.02, 1.02), title="λ by turn (teacher weight)")
    if turns:
        ax.legend(fontsize=7, ncol=2)
    save(fig, "lambda_by_turn.png")

    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    for ax, key in zip(axes.flat, ("loss", "distill", "pg", "value_loss", "entropy", "clipfrac"), strict=True):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, lw=1.0)
        ax.set(xlabel="step", title=key)
    save(fig, "losses.png")
    return paths
