"""The corruption suite's table (Markdown, CSV) and chart: metric against severity."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transferlab.robustness import ShiftResults


def shift_markdown(results: ShiftResults) -> str:
    """One row per corruption (a column per severity, then their mean); the mean of each
    severity, the clean value, the mean over the suite and the relative drop below."""
    severities = results.plan.severities
    metric = results.metric
    header = f"| corruption | {' | '.join(f'severity {s}' for s in severities)} | mean |"
    lines = [header, "|---" * (len(severities) + 2) + "|"]
    for corruption in results.shifted:
        cells = [f"{results.value(corruption, s):.4f}" for s in severities]
        lines.append(
            f"| {corruption} | {' | '.join(cells)} | {results.corruption_mean(corruption):.4f} |"
        )
    cells = [f"**{results.severity_mean(s):.4f}**" for s in severities]
    lines.append(f"| **mean** | {' | '.join(cells)} | **{results.mean:.4f}** |")
    lines += [
        "",
        f"- clean test {metric}: {results.clean[metric]:.4f}",
        f"- mean corrupted {metric} (every corruption and severity): {results.mean:.4f}",
        f"- relative drop from clean: {100 * results.relative_drop:.1f}%",
        f"- images per pass: {'all' if results.plan.limit is None else results.plan.limit}"
        f" test images; seed {results.plan.seed}",
    ]
    return "\n".join(lines) + "\n"


def shift_csv(results: ShiftResults) -> str:
    """corruption, severity, then every metric; ``clean`` at severity 0 first."""
    names = list(results.clean)
    lines = [",".join(["corruption", "severity", *names])]
    lines.append(",".join(["clean", "0", *(f"{results.clean[n]:.6f}" for n in names)]))
    for corruption, by_severity in results.shifted.items():
        for severity, scores in by_severity.items():
            values = (f"{scores.get(n, float('nan')):.6f}" for n in names)
            lines.append(",".join([corruption, str(severity), *values]))
    return "\n".join(lines) + "\n"


def shift_figure(results: ShiftResults, title: str):
    """The headline metric against severity (0 = clean), one line per corruption, the
    suite's mean in black."""
    import matplotlib.pyplot as plt

    severities = [0, *results.plan.severities]
    clean = results.clean[results.metric]
    figure, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    cmap = plt.get_cmap("tab20")
    for i, corruption in enumerate(results.shifted):
        values = [clean, *(results.value(corruption, s) for s in results.plan.severities)]
        ax.plot(severities, values, marker="o", ms=3, lw=1.2, color=cmap(i % 20), label=corruption)
    means = [clean, *(results.severity_mean(s) for s in results.plan.severities)]
    ax.plot(severities, means, color="black", lw=2.5, marker="s", label="mean")
    ax.set_xticks(severities, ["clean", *map(str, results.plan.severities)])
    ax.set_xlabel("severity")
    ax.set_ylabel(f"test {results.metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(
        f"{title}\nmean {results.metric} {results.mean:.3f} vs clean {clean:.3f} "
        f"({100 * results.relative_drop:.1f}% drop)",
        fontsize=10,
        wrap=True,
    )
    return figure
