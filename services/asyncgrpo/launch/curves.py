"""PNG curves of a run from its metrics.jsonl (one row per trainer step) and evals.jsonl (held-out
evaluations): reward, held-out accuracy, staleness and throughput, each alone and all four in curves.png.
matplotlib's object API without pyplot: no display, no global state, safe in any process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

MOVING_AVERAGE = 10  # steps: the batch reward is noisy (16 prompts), its trend is what a person reads


def parse_rows(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """JSON objects, one per line; blank and undecodable lines skipped (a crash can leave half a line)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_rows(path: Path | None) -> list[dict[str, Any]]:
    """parse_rows of a JSONL file; none when it is absent."""
    if path is None or not path.is_file():
        return []
    return parse_rows(path.read_text(errors="replace").splitlines())


def step_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows, one per version (the last written wins: after a crash the trainer replays the
    steps since its checkpoint, and the replayed step is the one in the model), in version order."""
    by_version: dict[int, dict[str, Any]] = {}
    for row in load_rows(path):
        if isinstance(row.get("version"), int):
            by_version[row["version"]] = row
    return [by_version[v] for v in sorted(by_version)]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(int(r["version"]))
            ys.append(float(v))
    return xs, ys


def _moving_average(ys: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= n:
            acc -= ys[i - n]
        out.append(acc / min(i + 1, n))
    return out


def _plot_reward(ax: Any, steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bool:
    xs, ys = _series(steps, "reward_mean")
    if not xs:
        return False
    ax.plot(xs, ys, color="tab:blue", alpha=0.3, lw=1, label="batch reward")
    ax.plot(xs, _moving_average(ys, MOVING_AVERAGE), color="tab:blue", lw=2, label=f"moving average ({MOVING_AVERAGE})")
    ax.set(title="reward (trained batches)", xlabel="step", ylabel="reward")
    return True


def _plot_accuracy(ax: Any, steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bool:
    served = sorted((e for e in evals if isinstance(e.get("version"), int) and e.get("source") != "final"),
                    key=lambda e: e["version"])
    final = sorted((e for e in evals if isinstance(e.get("version"), int) and e.get("source") == "final"),
                   key=lambda e: e["version"])
    if not served and not final:
        return False
    for rows, marker, label in ((served, "o-", "during the run"), (final, "s--", "warm start and final model")):
        for key, ci, color, name in (("reward", "reward_ci95", "tab:green", "sampled"),
                                     ("greedy_reward", "greedy_ci95", "tab:purple", "greedy")):
            pts = [(e["version"], e[key], e.get(ci)) for e in rows if isinstance(e.get(key), (int, float))]
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], fmt=marker,
                        color=color, capsize=3, alpha=1.0 if rows is served else 0.6, label=f"{name}, {label}")
    ax.set(title="held-out accuracy (95% intervals)", xlabel="policy version", ylabel="accuracy")
    return True


def _plot_staleness(ax: Any, steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bool:
    xs, mean = _series(steps, "staleness_mean")
    if not xs:
        return False
    ax.plot(xs, mean, color="tab:orange", label="mean")
    mx, worst = _series(steps, "staleness_max")
    if mx:
        ax.step(mx, worst, where="mid", color="tab:red", alpha=0.6, label="max")
    ax.set(title="staleness of trained samples", xlabel="step", ylabel="policy versions behind")
    return True


def _plot_throughput(ax: Any, steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bool:
    # seconds between consecutive step rows is the run's real pace (generation included); step_time_s is the
    # trainer's own compute
    pace = [(b["version"], b["time"] - a["time"]) for a, b in zip(steps, steps[1:])
            if isinstance(a.get("time"), (int, float)) and isinstance(b.get("time"), (int, float))
            and b["version"] == a["version"] + 1]
    xs, compute = _series(steps, "step_time_s")
    if not pace and not xs:
        return False
    if pace:
        ax.plot([p[0] for p in pace], _moving_average([p[1] for p in pace], MOVING_AVERAGE), color="tab:blue",
                label="seconds per step (wall clock)")
    if xs:
        ax.plot(xs, compute, color="tab:gray", alpha=0.7, label="trainer compute per step")
    ax.set(title="pace and training throughput", xlabel="step", ylabel="seconds")
    tx, tps = _series(steps, "tokens_per_s")
    if tx:
        ax2 = ax.twinx()
        ax2.plot(tx, _moving_average(tps, MOVING_AVERAGE), color="tab:green", alpha=0.7, label="training tokens/s")
        ax2.set_ylabel("training tokens/s")
        ax2.legend(fontsize=7, loc="lower right")
    return True


PANELS: dict[str, Callable[[Any, list[dict[str, Any]], list[dict[str, Any]]], bool]] = {
    "reward": _plot_reward, "accuracy": _plot_accuracy, "staleness": _plot_staleness, "throughput": _plot_throughput,
}


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    os.replace(tmp, path)  # a reader never sees half a PNG


def write_curves(metrics_jsonl: Path, evals_jsonl: Path | None, out_dir: Path, *, title: str = "") -> list[Path]:
    """reward.png, accuracy.png, staleness.png, throughput.png (those with data) and curves.png (all of
    them) in out_dir; returns the paths written."""
    from matplotlib.figure import Figure

    steps, evals = step_rows(metrics_jsonl), load_rows(evals_jsonl)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    drawn = []
    for name, plot in PANELS.items():
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        if plot(ax, steps, evals):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            _save(fig, out_dir / f"{name}.png")
            written.append(out_dir / f"{name}.png")
            drawn.append(name)
    if drawn:
        fig = Figure(figsize=(12, 8))
        for i, name in enumerate(drawn):
            ax = fig.add_subplot(2, 2, i + 1)
            PANELS[name](ax, steps, evals)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        _save(fig, out_dir / "curves.png")
        written.append(out_dir / "curves.png")
    return written
