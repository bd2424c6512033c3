"""Every case of `cases/` on the `tiny` and `small` synthetic cubes, end to end.

Each parameter set is one real run of the case through `cubebench run` (its own worker
process, the suite's one measurement path), shared by the `track_*` benchmarks: the test RMSE
is deterministic for a seed and gates CI; throughput, fit and warm-up time, the stall and the
worker's peak memory are tracked as the result file defines them.
"""

from __future__ import annotations

from benchmarks import CASE_PRESETS, CubeBenchmark, discover, memo, run_case

CASES = tuple(discover())


class CaseResult(CubeBenchmark):
    """What the suite reports for the case: accuracy, training throughput and its costs."""

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

    def track_fit_s(self, cubes: str, case: str, preset: str) -> float:
        return self._result(cubes, case, preset)["timing"]["fit_s"]

    track_fit_s.unit = "s"

    def track_warmup_s(self, cubes: str, case: str, preset: str) -> float:
        return self._result(cubes, case, preset)["timing"]["warmup_s"]

    track_warmup_s.unit = "s"

    def track_stall_percent(self, cubes: str, case: str, preset: str) -> float:
        stall = self._result(cubes, case, preset)["loading"]["stall_fraction"]
        return float("nan") if stall is None else 100.0 * stall

    track_stall_percent.unit = "%"

    def track_peak_rss_mb(self, cubes: str, case: str, preset: str) -> float:
        return self._result(cubes, case, preset)["memory"]["peak_rss_mb"]

    track_peak_rss_mb.unit = "MiB"
