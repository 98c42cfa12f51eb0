"""Figures of architectures and searches (matplotlib: optional, imported only here). Each drawing
takes plain data (genomes, result records) and writes a PNG; report.py chooses what to draw.

- architecture: each genome as a strip of LIV blocks coloured by family, with arcs from a
  leader to the LIVs that share from it (above: featurizer weights; below: computed features);
- progress: best and median perplexity per generation at the first rung, the baselines as lines;
- front: perplexity against the second objective, each point's budget marked, the front and the baselines;
- confirmation: each confirmed model's perplexity at the search's budget and at the longer one.
"""
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Arc, Patch, Rectangle  # noqa: E402

import genome as gn  # noqa: E402

FAMILIES = {"attention": ("attention (SA)", "#4878d0"), "sliding": ("sliding window (SWA)", "#82c6e2"),
            "recurrence": ("recurrence (Rec)", "#ee854a"), "delta": ("delta rule (Delta)", "#d65f5f"),
            "short_conv": ("short conv (GConv-1)", "#6acc64"), "long_conv": ("long conv (GConv-2)", "#956cb4"),
            "gated": ("gated MLP (GMemless)", "#b0b0b0")}


def architecture(genomes, path, title=None):
    """genomes: [(label, genome)], drawn one strip each, first at the top."""
    n = max(len(g) for _, g in genomes)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.4 * n + 2.5), 1.3 * len(genomes) + 1.0))
    for row, (label, genome) in enumerate(genomes):
        g, y = gn.as_array(genome), -2.2 * row
        ax.text(-0.7, y, label, ha="right", va="center", fontsize=8)
        for i, genes in enumerate(g):
            cls = gn.lookup(genes)
            ax.add_patch(Rectangle((i - 0.42, y - 0.45), 0.84, 0.9, facecolor=FAMILIES[cls.family][1],
                                   edgecolor="black", linewidth=0.6, hatch="///" if cls.diff else None))
            ax.text(i, y, cls.name, ha="center", va="center", fontsize=6, rotation=90,
                    bbox={"facecolor": "white", "alpha": 0.75, "linewidth": 0, "pad": 0.8} if cls.diff else None)
            for leader, up in ((gn.featurizer_leader(g, i), True), (gn.feature_leader(g, i), False)):
                if leader is not None:  # an arc from the leader to this follower
                    height, sign = min(1.5, 0.5 + 0.2 * (i - leader)), 1 if up else -1
                    ax.add_patch(Arc(((leader + i) / 2, y + 0.45 * sign), i - leader, height, theta1=0 if up else 180,
                                     theta2=180 if up else 360, linestyle="-" if up else "--", linewidth=1.1))
                    if not up:  # which features it reads
                        ax.text((leader + i) / 2, y - 0.45 - height / 2, gn.FEATURE_SHARING[g[i, gn.FT_STRATEGY]],
                                ha="center", va="top", fontsize=6)
    handles = [Patch(facecolor=color, edgecolor="black", label=name) for name, color in FAMILIES.values()]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="///", label="differential (Diff)"),
                plt.Line2D([], [], color="black", label="arc above: shares featurizer weights"),
                plt.Line2D([], [], color="black", linestyle="--", label="arc below: reads features (B, V, C)")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7, frameon=False)
    ax.set_xlim(-0.6 - 0.16 * max(len(label) for label, _ in genomes), n - 0.4)
    ax.set_ylim(-2.2 * (len(genomes) - 1) - 1.4, 1.4)
    ax.set_axis_off()
    ax.set_title(title or "architectures, input at the left (LIV 1) to output at the right", fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def progress(evaluations, baselines, steps, path):
    """Best and median perplexity of each generation's new candidates; baselines as lines: every
    result at one budget, `steps` (the first rung's)."""
    generations = sorted({e["generation"] for e in evaluations})
    ppl = {g: [e["ppl"] for e in evaluations if e["generation"] == g and e["status"] == "ok"] for g in generations}
    kept = [g for g in generations if ppl[g]]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(kept, [min(ppl[g]) for g in kept], "o-", label="best of the generation's new candidates")
    ax.plot(kept, [np.median(ppl[g]) for g in kept], "s--", label="median of them")
    ax.plot(kept, np.minimum.accumulate([min(ppl[g]) for g in kept]), ":", color="black", label="best so far")
    for (name, b), color in zip(baselines.items(), ("tab:red", "tab:purple", "tab:brown")):
        if b["status"] == "ok":
            ax.axhline(b["ppl"], color=color, linewidth=1, label=f"baseline {name}")
    ax.set_xticks(kept)
    ax.set_xlabel("generation (0: the initial population)"), ax.set_ylabel("validation perplexity")
    ax.set_title(f"search progress: every model after {steps} steps (the first rung)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


RUNG_MARKERS = "o^sDvP"  # a point's budget: the rung it reached


def front(evaluations, baselines, front_entries, x_key, objective, rungs, path):
    """Every candidate's perplexity against the second objective at the highest rung it reached
    (its marker), the front as a step line; each baseline at every rung (stars, budget beside)."""
    ok = [e for e in evaluations if e["status"] == "ok" and e.get(x_key) is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r, steps in enumerate(rungs):
        at = [e for e in ok if e.get("rung", 0) == r]
        points = ax.scatter([e[x_key] for e in at], [e["ppl"] for e in at], c=[e["generation"] for e in at],
                            cmap="viridis", s=22, marker=RUNG_MARKERS[r % len(RUNG_MARKERS)], vmin=0,
                            vmax=max([e["generation"] for e in ok] + [1]), label=f"candidates after {steps} steps")
    fig.colorbar(points, ax=ax, label="generation")
    f = sorted(front_entries, key=lambda e: e[x_key])
    ax.step([e[x_key] for e in f], [e["ppl"] for e in f], where="post", color="black", linewidth=1,
            label="front of the final population")
    for (name, results), color in zip(baselines.items(), ("tab:red", "tab:purple", "tab:brown")):
        done = [b for b in results if b["status"] == "ok" and b.get(x_key) is not None]
        ax.plot([b[x_key] for b in done], [b["ppl"] for b in done], "*:", color=color, ms=11, label=f"baseline {name}")
        for b in done:
            ax.annotate(str(rungs[b.get("rung", 0)]), (b[x_key], b["ppl"]), textcoords="offset points",
                        xytext=(6, -2), fontsize=6, color=color)
    ax.set_xlabel(x_key.replace("_", " ")), ax.set_ylabel("validation perplexity")
    ax.set_title(f"{objective}: each model at the highest rung it reached\n(the marker: its budget; a baseline's "
                 "budget beside it); lower left is better", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def confirmation(points, rho, axis_labels, path):
    """points: (label, kind, search value, confirmed values under each seed); each model at its mean
    with a bar over its seeds' range; baselines as stars."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"top": "tab:blue", "rank check": "tab:gray", "baseline": "tab:red"}
    for label, kind, x, ys in points:
        baseline, y = kind == "baseline", float(np.mean(ys))
        ax.errorbar([x], [y], yerr=[[y - min(ys)], [max(ys) - y]], fmt="*" if baseline else "o",
                    ms=12 if baseline else 6, color=colours[kind], capsize=3, label=kind)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(f"confirmation: does the search's order hold? Spearman {rho:.2f}", fontsize=9)
    ax.text(0.01, 0.01, "lower is better on both axes; points rising from left to right: the order holds",
            transform=ax.transAxes, fontsize=7, color="dimgray")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)

