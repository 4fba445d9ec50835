"""What a probe run leaves behind: metrics.json, the confusion matrix as a PNG and probe.safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from aim_megatron.config import ModelConfig
from aim_megatron.evaluation.probe import ProbeConfig, save_probe


def write_probe_results(out_dir: Path, metrics: dict, confusion: torch.Tensor, probe: nn.Module,
                        probe_cfg: ProbeConfig, model: ModelConfig) -> None:
    """metrics.json (``metrics`` as is), confusion.png and probe.safetensors (with a summary of the metrics)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = (f"{probe_cfg.kind} probe{' (random-init trunk)' if metrics['random_init'] else ''}: "
             f"top-1 {metrics['top1']:.1%}")
    save_confusion_png(confusion, metrics["class_names"], out_dir / "confusion.png", title)
    summary = {k: metrics[k] for k in ("top1", "top5", "num_train", "num_test")}
    save_probe(out_dir / "probe.safetensors", probe, probe_cfg, metrics["layers"], model, metrics["class_names"],
               summary)


def save_confusion_png(cm: torch.Tensor, class_names: list[str], path: str | Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = cm.shape[0]
    names = class_names if len(class_names) == c else [str(i) for i in range(c)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * c, 0.8 + 0.55 * c))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    if c <= 30:
        top = cm.max().item()
        for i in range(c):
            for j in range(c):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
