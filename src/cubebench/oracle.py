"""The noise-free target of a synthetic cube, on the samples a case is evaluated on.

A synthetic cube's target is a known function of the task's features plus noise
(`cubebench.cube.synthetic`). Evaluating that function on the very pixels a case is scored on
gives the **realised** floor: the RMSE the perfect model would get on those pixels, not the
noise's nominal standard deviation. Cubes whose generating function is unknown (real cubes, a
generator version this module does not know) have none.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cubebench.cube import synthetic
from cubebench.loading.patches import channel_names
from cubebench.task import PreparedTask

NEEDED = ("air_temperature_2m", "lat", "sin_doy", "cos_doy")

Oracle = Callable[[np.ndarray], np.ndarray]  # normalised x batch -> noise-free target (units)


def noise_free_target(task: PreparedTask) -> Oracle | None:
    """A function from a batch of normalised features (pixels `x[B, F]` or windows
    `x[B, C, h, w]`) to the noise-free target in physical units (`[B]` or `[B, t, h, w]`);
    None unless the cube's generating function is the one this suite knows and the task's
    features carry what it needs (air temperature in K, latitude, sin and cos of the season)."""
    attrs, spec = task.cube.attrs, task.spec
    known = (
        attrs.get("cubebench_generating_function") == synthetic.GENERATING_FUNCTION
        and attrs.get("cubebench_noise_floor_variable") == spec.target
        and task.cube["air_temperature_2m"].attrs.get("units") == "K"
        if "air_temperature_2m" in task.cube
        else False
    )
    if not known or not set(NEEDED) <= set(spec.features):
        return None
    mean = dict(zip(spec.features, task.feature_mean))
    std = dict(zip(spec.features, task.feature_std))

    def physical(values: np.ndarray, name: str) -> np.ndarray:
        return values.astype(np.float64) * std[name] + mean[name]

    def expected(columns: dict[str, np.ndarray]) -> np.ndarray:
        angle = np.arctan2(columns["sin_doy"], columns["cos_doy"])
        return synthetic.lst_oracle(columns["air_temperature_2m"], columns["lat"], angle)

    if spec.patch is None:
        index = {name: spec.features.index(name) for name in NEEDED}
        return lambda x: expected({n: physical(x[:, j], n) for n, j in index.items()})

    steps = spec.patch.size[0]
    names = channel_names(spec, steps)

    def windows(x: np.ndarray) -> np.ndarray:
        out = []
        for k in range(steps):
            channel = {n: names.index(n if steps == 1 else f"{n}@{k}") for n in NEEDED}
            out.append(expected({n: physical(x[:, j], n) for n, j in channel.items()}))
        return np.stack(out, axis=1)

    return windows
