"""Every case of `cases/` on the `tiny` and `small` synthetic cubes.

`time_fit` / `peakmem_fit` time `Case.fit` alone, in this process, after the same preparation
and `setup` the worker does (untimed). The `track_*` numbers come from one real run of the
case through `cubebench run` (its own worker process) per parameter set: the test RMSE is
deterministic for a seed and gates CI; throughput is tracked.
"""

from __future__ import annotations

from benchmarks import CASE_PRESETS, SEED, THREADS, CubeBenchmark, cube_path, memo, run_case
from cubebench.runner import discover

CASES = tuple(discover())


class CaseFit(CubeBenchmark):
    """Training alone: what the case's library does with the streams it is handed."""

    params = (CASES, CASE_PRESETS)
    param_names = ("case", "preset")
    number = 1  # a fit per sample: setup builds a fresh model before each
    repeat = (1, 3, 60.0)  # at least one fit, at most three, no new one after 60 s
    rounds = 1  # a fit is long enough to be its own warm-up-free sample
    warmup_time = 0.0

    def setup(self, cubes: str, case: str, preset: str) -> None:
        from cubebench.case import Context
        from cubebench.cube import open_cube
        from cubebench.task import get_task, prepare_task
        from cubebench.worker import resolve_device

        _, cls = discover()[case]
        task = prepare_task(get_task(cls.task), open_cube(cube_path(cubes, preset)))
        device = resolve_device("auto", cls.devices)
        context = Context(task, dict(cls.parameters), device=device, seed=SEED, threads=THREADS)
        self.case = cls(context)
        self.case.setup()

    def time_fit(self, cubes: str, case: str, preset: str) -> None:
        self.case.fit()

    def peakmem_fit(self, cubes: str, case: str, preset: str) -> None:
        self.case.fit()


class CaseResult(CubeBenchmark):
    """What the suite reports for the case: accuracy and training throughput."""

    params = (CASES, CASE_PRESETS)
    param_names = ("case", "preset")

    def _result(self, cubes: str, case: str, preset: str) -> dict:
        return memo(cubes, f"case-{preset}-{case}", lambda: run_case(cubes, case, preset))

    def track_test_rmse(self, cubes: str, case: str, preset: str) -> float:
        return self._result(cubes, case, preset)["metrics"]["rmse"]

    track_test_rmse.unit = "K"

    def track_rmse_over_noise_floor(self, cubes: str, case: str, preset: str) -> float:
        return self._result(cubes, case, preset)["metrics"]["rmse_over_noise_floor"]

    track_rmse_over_noise_floor.unit = "ratio"

    def track_train_samples_per_s(self, cubes: str, case: str, preset: str) -> float:
        return self._result(cubes, case, preset)["throughput"]["train_samples_per_s"]

    track_train_samples_per_s.unit = "samples/s"
