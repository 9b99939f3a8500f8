"""PNG plots of validation loss against training FLOPs and against training time, per mode."""

from __future__ import annotations

import statistics
from pathlib import Path

COLORS = {"rackwise": "tab:blue", "stackwise": "tab:orange", "stackwise_joint": "tab:green", "blockwise": "tab:red"}


def plot_modes(modes: dict, prefix: Path) -> list[str]:
    """Two PNGs (``{prefix}_val_loss_vs_flops.png``, ``..._vs_time.png``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark machine
    import matplotlib.pyplot as plt

    per_mode = modes["modes_detail"]["per_mode"]
    written = []
    for x_key, x_label, scale, suffix in (("flops", "training FLOPs (PFLOP)", 1e-15, "flops"),
                                          ("train_time_s", "training time (s, sum of step times)", 1.0, "time")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode, detail in per_mode.items():
            _plot_mode(ax, mode, detail["curves"], x_key, scale)
        ax.axvline(modes["modes_detail"]["budget_flops"] * scale if x_key == "flops" else float("nan"),
                   color="grey", lw=0.8, ls=":")
        title = f"equal FLOP budget, mean of {len(modes['modes_detail']['seeds'])} seed(s)"
        written.append(_finish(fig, ax, x_label, title, _upper_limit(per_mode), prefix, suffix))
    return written


def _plot_mode(ax, mode: str, curves: list[list[dict]], x_key: str, scale: float, color=None,
               linestyle: str = "-") -> None:
    """Thin line per seed, thick line for the mean over seeds (evaluations align across seeds)."""
    color = color or COLORS.get(mode)
    for curve in curves:
        ax.plot([p[x_key] * scale for p in curve], [p["val_loss"] for p in curve], color=color, alpha=0.25, lw=0.8,
                ls=linestyle)
    n = min(len(c) for c in curves)
    xs = [statistics.mean(c[i][x_key] for c in curves) * scale for i in range(n)]
    ys = [statistics.mean(c[i]["val_loss"] for c in curves) for i in range(n)]
    ax.plot(xs, ys, color=color, lw=2, marker="o", ms=3, label=mode, ls=linestyle)


def _upper_limit(per_mode: dict) -> float:
    """Cut the y axis above the first evaluation after step 0, so the untrained loss does not squash the rest."""
    later = [p["val_loss"] for d in per_mode.values() for c in d["curves"] for p in c if p["step"] > 0]
    return max(later) + 0.1 if later else None


def plot_quality(quality: dict, prefix: Path) -> list[str]:
    """Validation loss against wall-clock and against training FLOPs, one colour per mode family (the
    end-to-end runs black and grey; a growth mode's identity-init variant dashed in its colour): a thin
    line per seed (the spread) and a thick seed-mean line; returns the two PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detail, budget = quality["detail"], quality["budget"]
    baseline = quality.get("baseline", "rackwise")
    target = budget.get("baseline_final_mean_val_loss", budget["rackwise_final_mean_val_loss"])
    written = []
    for x_key, x_label, scale, suffix in (("wall_s", "wall-clock since launch (s), 2 pinned ranks", 1.0, "wall"),
                                          ("flops", "training FLOPs (TFLOP)", 1e-12, "flops")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for mode, d in detail.items():
            _plot_mode(ax, mode, d["curves"], x_key, scale, color=QUALITY_COLORS.get(mode.removesuffix("_identity")),
                       linestyle="--" if _identity_init(budget, mode) else "-")
        if x_key == "wall_s":
            ax.axvline(budget["wall_s"], color="grey", lw=0.8, ls=":")
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        title = f"{_tokens_per_parameter(budget)}{len(budget['seeds'])} seed(s); grey: {baseline}'s final loss"
        written.append(_finish(fig, ax, x_label, title, _upper_limit(detail), prefix, suffix, legend_size=8))
    return written


# The quality study's modes (None: matplotlib's next colour); an ``_identity`` variant takes its mode's colour.
QUALITY_COLORS = {"rackwise": "black", "rackwise_wsd": "dimgrey", "doubling": "tab:blue", "midas": "tab:green",
                  "grow_late": "tab:red", "progressive": "tab:orange", "grow_once": "tab:purple",
                  "greedy": "tab:brown"}


def _identity_init(budget: dict, mode: str) -> bool:
    return budget.get("modes", {}).get(mode, {}).get("training.growth_init") == "identity"


def _tokens_per_parameter(budget: dict) -> str:
    per_parameter = budget.get("tokens_per_parameter")
    return "" if per_parameter is None else f"{per_parameter:.3g} tokens per non-embedding parameter, "


def _finish(fig, ax, x_label: str, title: str, y_top: float | None, prefix: Path, suffix: str,
            legend_size: float | None = None) -> str:
    """Labels, grid and legend of a validation-loss plot; saves ``{prefix}_val_loss_vs_{suffix}.png``."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(x_label)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    ax.set_ylim(top=y_top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    path = prefix.with_name(f"{prefix.name}_val_loss_vs_{suffix}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
