"""Client feedback for blocking remote traces: queued (position k), running stage k of n, completed.

Shown as one updating line (a tqdm bar in a terminal or notebook), silent with ``verbose=False``
or ``nnsight_dask.config.verbose = False``. The line appears only once an experiment has taken
longer than a poll interval (0.2 s): quick experiments print nothing and pay nothing for it.
"""
from __future__ import annotations

from typing import Any

from .. import config


class ExperimentProgress:
    """An ``on_status`` callback for :func:`~nnsight_dask.scheduler.experiment.run_experiment`."""

    def __init__(self, deployment: str, verbose: bool | None = None) -> None:
        self.deployment = deployment
        self.enabled = config.verbose if verbose is None else verbose
        self.bar: Any = None

    def __call__(self, status: str, info: dict[str, Any]) -> None:
        if not self.enabled or (self.bar is None and status == "completed"):
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            # no rate: stages differ wildly in length, so "stages/s" would only mislead
            # disable=None: no bar where stderr is not a terminal (logs, CI), where it would only litter
            self.bar = tqdm(total=info.get("stages", 1), desc=self.deployment, leave=False, disable=None,
                            bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} stages [{elapsed}]")
        bar = self.bar
        if status == "running" and "stages" in info:
            bar.total = info["stages"]
            bar.n = info.get("stage", 0)
            bar.set_description_str(f"{self.deployment}: running stage {bar.n + 1 if bar.n < bar.total else bar.n} of {bar.total}")
        elif status == "queued" and info.get("position"):
            bar.set_description_str(f"{self.deployment}: queued, {info['position']} experiment(s) ahead")
        elif status in ("queued", "retrying"):
            bar.set_description_str(f"{self.deployment}: {status}")
        elif status == "completed":
            bar.n = bar.total
            bar.set_description_str(f"{self.deployment}: completed")
            self.close()
            return
        bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
