"""The `eft eval --plot` figure: up-scaling bars and the mixing trade-off curve."""

from pathlib import Path


def plot_results(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("eft eval --plot needs matplotlib: pip install 'eft-serve[plot]'") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = results["rows"]
    width = 0.27
    for offset, metric in enumerate(("format", "facts", "both")):
        xs = [i + (offset - 1) * width for i in range(len(rows))]
        bars.bar(xs, [r[metric] for r in rows], width, label=metric)
    bars.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=20, ha="right")
    bars.set_ylabel("% of questions")
    bars.set_ylim(0, 105)
    bars.set_title("Up-scaling: large base + small chat delta")
    bars.legend(loc="upper left")

    mixing = results["mixing"]
    lambdas = [p["lambda"] for p in mixing]
    curve.plot(lambdas, [p["answered"] for p in mixing], marker="o", label="answered")
    curve.plot(lambdas, [p["refused"] for p in mixing], marker="s", label="refused")
    curve.set_xlabel("lambda (weight of the helpful delta; 1 - lambda on the safe delta)")
    curve.set_ylabel("% of questions on the refused attribute")
    curve.set_ylim(-5, 105)
    curve.set_title("Behaviour mixing at test time")
    curve.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
