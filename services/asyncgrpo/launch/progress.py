"""The progress display of `asyncgrpo up`: a live panel (rich) on a terminal, one plain line per step
otherwise (a log file, CI, a pipe), from ProgressSnapshots that launch/monitor.py builds.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass
class ProgressSnapshot:
    step: int  # optimizer steps taken (= policy version)
    total_steps: int
    elapsed_s: float  # since this `up` started
    state: str = "running"  # running / paused / draining / stopping
    reward: float | None = None  # trainer batch reward mean of the last step
    rollout_reward: float | None = None  # mean reward of all sampled completions, recent window
    eval_reward: float | None = None  # held-out sampled accuracy at the last evaluation
    eval_greedy: float | None = None  # held-out greedy accuracy at the last evaluation
    eval_step: int | None = None  # the version the last evaluation ran at
    queue_depth: int | None = None
    staleness_mean: float | None = None
    staleness_max: float | None = None
    stale_dropped: int | None = None  # groups dropped as stale, total
    gen_tokens_per_s: float | None = None
    train_tokens_per_s: float | None = None
    step_time_s: float | None = None
    steps_per_s: float | None = None  # recent rate (0: not known yet); None: step / elapsed

    def eta_s(self) -> float | None:
        if self.steps_per_s is not None:  # the caller's measured rate (0: not measurable yet)
            rate: float | None = self.steps_per_s
        else:
            rate = self.step / self.elapsed_s if self.elapsed_s > 0 and self.step > 0 else None
        return (self.total_steps - self.step) / rate if rate else None


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _eval(s: ProgressSnapshot) -> str:
    if s.eval_reward is None:
        return "-"
    greedy = f" greedy {_f(s.eval_greedy)}" if s.eval_greedy is not None else ""
    at = f" @{s.eval_step}" if s.eval_step is not None else ""
    return f"{_f(s.eval_reward)}{greedy}{at}"


def plain_line(s: ProgressSnapshot) -> str:
    return (f"step {s.step}/{s.total_steps} | reward {_f(s.reward)} rollout {_f(s.rollout_reward)} | "
            f"held-out {_eval(s)} | queue {_f(s.queue_depth, 'd') if s.queue_depth is not None else '-'} | "
            f"staleness {_f(s.staleness_mean, '.2f')} max {_f(s.staleness_max, '.0f')} dropped "
            f"{s.stale_dropped if s.stale_dropped is not None else '-'} | gen {_f(s.gen_tokens_per_s, '.0f')} tok/s "
            f"train {_f(s.train_tokens_per_s, '.0f')} tok/s | {_f(s.step_time_s, '.2f')} s/step | "
            f"ETA {format_eta(s.eta_s())}")


class ProgressView:
    """`with ProgressView(total) as v: v.update(snap)`. live=None: live iff the output is a terminal."""

    def __init__(self, total_steps: int, *, live: bool | None = None, file: IO[str] | None = None) -> None:
        self.total = total_steps
        self.file = file or sys.stdout
        if live is None:  # a terminal that can redraw (not TERM=dumb, where rich would show nothing until the end)
            from rich.console import Console

            live = Console(file=self.file).is_interactive
        self.live = live
        self._last_step: int | None = None
        self._last_snap: ProgressSnapshot | None = None
        self._last_state: str | None = None
        self._live: Any = None
        self._console: Any = None

    def __enter__(self) -> "ProgressView":
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.file)
            self._live = Live(self._render(None), console=self._console, refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def note(self, text: str) -> None:
        """A message above the live panel (or a plain line)."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.file, flush=True)

    def update(self, snap: ProgressSnapshot) -> None:
        if self._live is not None:
            self._live.update(self._render(snap))
        else:
            if snap.step != self._last_step and snap.step > 0:
                print(plain_line(snap), file=self.file, flush=True)
            if snap.state != (self._last_state or "running"):
                print(f"run {snap.state}", file=self.file, flush=True)
        self._last_step, self._last_state, self._last_snap = snap.step, snap.state, snap

    def save_svg(self, path: Path, width: int = 118) -> bool:
        """The panel of the last update as an SVG picture (also when the output was plain lines): what the run
        looked like when it ended. False when there was nothing to draw or the file cannot be written."""
        import io

        from rich.console import Console

        if self._last_snap is None:
            return False
        console = Console(record=True, file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")
        console.print(self._render(self._last_snap))
        try:
            path.write_text(console.export_svg(title="asyncgrpo up"), encoding="utf-8")
        except OSError:
            return False
        return True

    def _render(self, s: ProgressSnapshot | None) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        if s is None:
            return Table.grid()
        head = Table.grid(padding=(0, 1))
        head.add_row(ProgressBar(total=max(self.total, 1), completed=min(s.step, self.total), width=40),
                     Text(f"step {s.step}/{self.total}"), Text(s.state, style="bold"),
                     Text(f"elapsed {format_eta(s.elapsed_s)}"), Text(f"ETA {format_eta(s.eta_s())}"))
        t = Table(show_header=False, box=None, padding=(0, 2))
        t.add_row("reward (batch / all sampled)", f"{_f(s.reward)} / {_f(s.rollout_reward)}",
                  "held-out accuracy (sampled, greedy)", _eval(s))
        t.add_row("queue depth", "-" if s.queue_depth is None else str(s.queue_depth),
                  "staleness mean / max, dropped", f"{_f(s.staleness_mean, '.2f')} / {_f(s.staleness_max, '.0f')}, "
                  f"{'-' if s.stale_dropped is None else s.stale_dropped}")
        t.add_row("generation tokens/s", _f(s.gen_tokens_per_s, ".0f"), "training tokens/s, s/step",
                  f"{_f(s.train_tokens_per_s, '.0f')}, {_f(s.step_time_s, '.2f')}")
        return Group(head, t)
