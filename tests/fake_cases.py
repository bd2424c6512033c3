"""Case files the tests write into a temporary cases directory, as a user would add one."""

from __future__ import annotations

MEAN_CASE = '''
import numpy as np
from cubebench.case import Case as Base

class Case(Base):
    """Predicts the train mean (zero, normalised): its metrics are known exactly."""
    name = "{name}"
    library = "numpy"
    task = "{task}"
    parameters = {{"epochs": 2}}

    def fit(self):
        {wait}
        stream = self.context.stream("train")
        for epoch in range(self.params["epochs"]):
            n, sq = 0, 0.0
            for x, y in self.context.timed_batches(stream, epoch):
                n += len(y)
                sq += float(y @ y)
            self.context.log_epoch(
                epoch, sq / n, None, seconds=0.1, samples=n, of=self.params["epochs"]
            )

    def predict(self, x):
        return np.zeros(len(x))
'''


def mean_case(name: str = "mean", wait: str = "pass", task: str = "lst-from-t2m") -> str:
    """The source of a case that predicts the train mean; `wait` (one line) runs first in
    `fit`."""
    return MEAN_CASE.format(name=name, wait=wait, task=task)
