"""The loss-curve PNG of a run: training loss per step (raw and smoothed) and the evaluation points."""

from .._optional import require

__all__ = ["plot_history"]


def plot_history(history, path, title=""):
    """Write ``path`` (PNG) from a history dict {"step": [...], "loss": [...], "eval": [{"step", ...}]}."""
    matplotlib = require("matplotlib", "train", "the loss plot")
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps, loss = history["step"], history["loss"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="train loss")
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(loss))]
    ax.plot(steps, smooth, lw=1.5, label=f"train loss (mean of {window})")
    evals = [e for e in history["eval"] if any(k.endswith("loss") for k in e)]
    if evals:
        key = next(k for k in evals[0] if k.endswith("loss"))
        ax.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", label=f"eval {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
