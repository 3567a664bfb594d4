"""PNG plots (matplotlib, headless): per-GPU load before/after, imbalance distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.loads import max_over_mean


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps legends placed outside the axes
    plt.close(fig)
    return path


def plot_load_per_gpu(vanilla: np.ndarray, micro_ep: np.ndarray, path: str | Path, title: str) -> Path:
    """Grouped bars: tokens per GPU under vanilla EP and under MicroEP, with both max/mean ratios.

    Args:
        vanilla: [F] tokens per GPU if the MicroEP group ran as separate vanilla EP groups.
        micro_ep: [F] tokens per GPU under the MicroEP plan.
    """
    plt = _pyplot()
    vanilla, micro_ep = np.asarray(vanilla, dtype=float), np.asarray(micro_ep, dtype=float)
    gpus = np.arange(len(vanilla))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(gpus) + 2), 3.6))
    ax.bar(gpus - 0.2, vanilla, 0.4, label=f"vanilla EP (max/mean {max_over_mean(vanilla):.3f})", color="#c44e52")
    ax.bar(gpus + 0.2, micro_ep, 0.4, label=f"MicroEP (max/mean {max_over_mean(micro_ep):.3f})", color="#4c72b0")
    ax.axhline(vanilla.mean(), color="gray", linestyle="--", linewidth=1, label="mean")
    ax.set_xlabel("GPU")
    ax.set_ylabel("tokens (token-expert assignments)")
    ax.set_xticks(gpus)
    ax.set_title(title)
    ax.set_ylim(0, 1.05 * max(vanilla.max(), micro_ep.max(), 1.0))
    # below the axes: never over the data
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    return _save(plt, fig, path)


def plot_imbalance_distribution(per_layer: dict[int, tuple[np.ndarray, np.ndarray]], path: str | Path,
                                title: str) -> Path:
    """Box plots of GPU max/mean per layer, vanilla EP next to MicroEP.

    Args:
        per_layer: layer -> ([steps] vanilla max/mean, [steps] MicroEP max/mean).
    """
    plt = _pyplot()
    layers = sorted(per_layer)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(layers) + 2), 3.6))
    positions = np.arange(len(layers)) * 3.0
    box = dict(widths=0.8, patch_artist=True, showfliers=False)
    vanilla = ax.boxplot([per_layer[n][0] for n in layers], positions=positions - 0.5, **box)
    micro = ax.boxplot([per_layer[n][1] for n in layers], positions=positions + 0.5, **box)
    for patch in vanilla["boxes"]:
        patch.set_facecolor("#c44e52")
    for patch in micro["boxes"]:
        patch.set_facecolor("#4c72b0")
    ax.set_xticks(positions)
    ax.set_xticklabels([str(n) for n in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("GPU max / mean tokens (1 = balanced)")
    ax.legend([vanilla["boxes"][0], micro["boxes"][0]], ["vanilla EP", "MicroEP"], title_fontsize=8,
              title="boxes: quartiles, line: median, whiskers: 1.5 IQR", fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    ax.set_title(title)
    return _save(plt, fig, path)
