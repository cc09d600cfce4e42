"""PNG plots from a bench document (matplotlib, imported here only): resident memory over time of
every strategy on one model, latency against pipeload's budget with the baselines beside, and the
paper's comparison across models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MB = 1e6


def model_name(model: str) -> str:
    return Path(model).name or model


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _name(r: dict[str, Any]) -> str:
    return r["label"] + (f" @ {r['budget']}" if r["budget"] else "")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def plot_memory(doc: dict[str, Any], model: str, profile: str, path: Path) -> Path | None:
    """RSS over time (first successful process of each configuration), one-shot marked."""
    records = [r for r in doc["records"] if r["model"] == model and r["profile"] == profile]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = 0
    for r in records:
        sample = next((s for s in r["samples"] if s["ok"] and s["rss_curve"]), None)
        if sample is None:
            continue
        t, rss = zip(*sample["rss_curve"], strict=True)
        (line,) = ax.plot(t, [v / MB for v in rss], label=_name(r), linewidth=1.2)
        if sample["one_shot_s"]:
            ax.axvline(sample["one_shot_s"], color=line.get_color(), linestyle=":", linewidth=0.8)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(
        xlabel="seconds since process start (dotted: first outputs)",
        ylabel="resident memory (MB)",
        title=f"{model_name(model)}, profile {profile}: resident memory over time",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(doc: dict[str, Any], model: str, path: Path) -> Path | None:
    """One panel per profile: pipeload's one-shot and steady latency against its budget; the
    baselines' one-shot latency as horizontal lines (their peak in the label); the compute floor."""
    records = [r for r in doc["records"] if r["model"] == model]
    profiles = list(dict.fromkeys(r["profile"] for r in records))
    if not profiles:
        return None
    plt = _pyplot()
    cols = min(3, len(profiles))
    rows = (len(profiles) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, profile in zip(axes.flat, profiles, strict=False):
        group = [r for r in records if r["profile"] == profile]
        pipe = sorted(
            (r for r in group if r["label"] == "pipeload" and r["ok_repeats"]),
            key=lambda r: r["budget_bytes"] or r["peak_rss_bytes"],
        )
        if pipe:
            x = [(r["budget_bytes"] or r["peak_rss_bytes"]) / MB for r in pipe]
            ax.plot(x, [r["one_shot_s"] for r in pipe], "o-", color="C0", label="pipeload one-shot")
            ax.plot(
                x,
                [r["steady_s"] for r in pipe],
                "s--",
                color="C0",
                alpha=0.6,
                label="pipeload steady",
            )
            for xi, r in zip(x, pipe, strict=True):
                ax.annotate(
                    r["budget"],
                    (xi, r["one_shot_s"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        for i, r in enumerate(r for r in group if r["label"] != "pipeload"):
            if r["ok_repeats"]:
                ax.axhline(
                    r["one_shot_s"],
                    color=f"C{i + 1}",
                    linestyle="-",
                    linewidth=1,
                    label=f"{r['label']} ({r['peak_rss_bytes'] / MB:.0f} MB peak)",
                )
                if r["steady_s"]:
                    ax.axhline(
                        r["steady_s"], color=f"C{i + 1}", linestyle="--", linewidth=0.8, alpha=0.6
                    )
        floor = next((r["compute_floor_s"] for r in group if r["compute_floor_s"]), None)
        if floor:
            ax.axhline(floor, color="grey", linestyle=":", label="compute floor")
        ax.set(
            title=f"profile {profile}",
            xlabel="pipeload budget (MB; none: its peak)",
            ylabel="latency (s): one-shot solid, steady dashed",
        )
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(profiles) :]:
        ax.axis("off")
    fig.suptitle(f"{model_name(model)}: latency against budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paper(doc: dict[str, Any], profile: str, path: Path) -> Path | None:
    """The paper's comparison on one profile: pipeload's one-shot speedup and memory reduction
    against pipeswitch, per model and budget, with the paper's headline for its family as a mark."""
    from bench.render import PAPER_HEADLINE, model_families

    families = model_families(doc)
    pipes = [
        r
        for r in doc["records"]
        if r["profile"] == profile
        and r["label"] == "pipeload"
        and r["ok_repeats"]
        and r.get("vs_pipeswitch")
    ]
    if not pipes:
        return None
    models = list(dict.fromkeys(r["model"] for r in pipes))
    budgets = list(dict.fromkeys(r["budget"] for r in pipes))
    plt = _pyplot()
    fig, (ax_x, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(budgets)
    for j, budget in enumerate(budgets):
        at = {r["model"]: r["vs_pipeswitch"] for r in pipes if r["budget"] == budget}
        xs = [i + (j - (len(budgets) - 1) / 2) * width for i in range(len(models))]
        ax_x.bar(
            xs,
            [at.get(m, {}).get("one_shot_speedup", 0) for m in models],
            width,
            label=f"pipeload @ {budget}",
        )
        ax_m.bar(
            xs,
            [100 * at.get(m, {}).get("memory_reduction", 0) for m in models],
            width,
            label=f"pipeload @ {budget}",
        )
    label = "paper (vs PipeSwitch)"  # on the first mark only
    for i, m in enumerate(models):
        head = PAPER_HEADLINE.get(families.get(m, ""))
        if head:
            ax_x.plot([i - 0.45, i + 0.45], [head[0]] * 2, "k--", linewidth=1, label=label)
            ax_m.plot([i - 0.45, i + 0.45], [100 * head[1]] * 2, "k--", linewidth=1, label=label)
            label = None
    for ax, what in (
        (ax_x, "one-shot speedup vs pipeswitch (x)"),
        (ax_m, "memory reduction vs pipeswitch (%)"),
    ):
        ax.set_xticks(range(len(models)), [model_name(m) for m in models], rotation=20)
        ax.set(ylabel=what)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    ax_x.axhline(1, color="grey", linewidth=0.8)
    fig.suptitle(f"pipeload against pipeswitch, profile {profile} (medians of fresh processes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """memory-MODEL-PROFILE.png for every model and profile, latency-MODEL.png for every model,
    paper-PROFILE.png for every profile."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    profiles = list(dict.fromkeys(r["profile"] for r in doc["records"]))
    for model in dict.fromkeys(r["model"] for r in doc["records"]):
        name = _safe(model_name(model))
        for profile in profiles:
            p = plot_memory(doc, model, profile, out_dir / f"memory-{name}-{_safe(profile)}.png")
            written += [p] if p else []
        p = plot_latency(doc, model, out_dir / f"latency-{name}.png")
        written += [p] if p else []
    for profile in profiles:
        p = plot_paper(doc, profile, out_dir / f"paper-{_safe(profile)}.png")
        written += [p] if p else []
    return written
