"""scikit-learn `HistGradientBoostingRegressor` filling LST gaps pixel by pixel: the classical
baseline of the U-Nets (`torch-cnn`, `keras-cnn`) on the same windows.

A tree model sees one pixel, so the window's context is handed to it as features computed
from the window's channels: the pixel's own inputs and coordinates and, in square
neighbourhoods of each size in `neighbourhoods` (cut at the window's edges), the fraction of
visible LST pixels, their mean visible LST and, for every input, the mean of visible
`LST - r * input` (r = input std / LST std: in physical units, the LST - input offset up to a
constant) and that mean added back to the pixel's own `r * input` (a neighbourhood fill).
Means over no visible pixel are NaN, which the trees handle natively. Box sums are
`scipy.ndimage.uniform_filter` over whole batches of windows: no per-pixel Python.

Training pixels are the pixels to fill (the mask) of one pass over the training windows, a
seeded subsample of `max_samples` if there are more; the validation part's likewise (up to
`max_val_samples`) early-stops the boosting. The pass goes through `context.timed_batches`,
so its data stall is measured. Samples are windows, as in the other cases of the task.
Epoch records are the boosting curve, as in `sklearn_hgb.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base
from cubebench.models import log_boosting_curve

RECORDS = 10


class Case(Base):
    name = "sklearn-hgb-gapfill"
    library = "scikit-learn"
    task = "lst-gapfill"
    devices = ("cpu",)
    parameters: ClassVar[dict[str, Any]] = {
        "batch_size": 256,  # windows per batch of the streams (features are cut per batch)
        "neighbourhoods": [5, 9],  # square sizes (pixels) of the neighbourhood features
        "max_samples": 200_000,  # training pixels held in memory
        "max_val_samples": 100_000,  # validation pixels, for early stopping
        "max_iter": 300,
        "learning_rate": 0.1,
        "max_leaf_nodes": 31,
        "min_samples_leaf": 20,
        "l2_regularization": 0.0,
        "n_iter_no_change": 20,
    }
    # what the tests run it with on the tiny cube: short, and still learning
    test_parameters: ClassVar[dict[str, Any]] = {"max_iter": 30}

    def setup(self) -> None:
        from sklearn.ensemble import HistGradientBoostingRegressor

        from cubebench.loading import open_stream

        p, task = self.params, self.context.task
        self.sizes = tuple(int(k) for k in p["neighbourhoods"])
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"neighbourhoods must be positive sizes, got {self.sizes!r}")
        probe = open_stream(task, "train", batch_size=1, shuffle=False, threads=1)
        t, _, _ = probe.window
        names = [n.split("@")[0] for n in probe.channel_names[: len(probe.channel_names) // t]]
        self.steps = t
        self.inputs = [names.index(v) for v in task.spec.inputs]
        self.coords = [names.index(v) for v in task.spec.coord_features]
        self.visible_lst, self.visible = names.index("visible_lst"), names.index("visible")
        # input j in LST's normalised units: r_j * x_j = (input_j - its mean) / LST's std
        n_in = len(task.spec.inputs)
        self.ratios = (task.feature_std[:n_in] / task.target_std).astype(np.float32)
        self.model = HistGradientBoostingRegressor(
            loss="squared_error",
            learning_rate=float(p["learning_rate"]),
            max_iter=int(p["max_iter"]),
            max_leaf_nodes=int(p["max_leaf_nodes"]),
            min_samples_leaf=int(p["min_samples_leaf"]),
            l2_regularization=float(p["l2_regularization"]),
            early_stopping=True,
            scoring="loss",
            n_iter_no_change=int(p["n_iter_no_change"]),
            random_state=self.context.seed,
        )

    # --- features ---------------------------------------------------------------------------

    def features(self, x: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Features `[n, F]` (float32) of the pixels `where` (`[B, t, h, w]`, boolean) of
        the windows `x[B, C, h, w]`; computed on whole planes, gathered at `where`."""
        from scipy.ndimage import uniform_filter

        b, _, h, w = x.shape
        planes = x.reshape(b * self.steps, -1, h, w)  # one plane stack per (window, step)
        where = where.reshape(b * self.steps, h, w)
        visible = planes[:, self.visible]
        visible_lst = planes[:, self.visible_lst] * visible
        scaled = [planes[:, j] * r for j, r in zip(self.inputs, self.ratios)]
        columns = [planes[:, j][where] for j in (*self.inputs, *self.coords)]
        for k in self.sizes:

            def box(a: np.ndarray, k: int = k) -> np.ndarray:  # mean over the k x k square
                return uniform_filter(a, size=(1, k, k), mode="constant", cval=0.0)

            # the filter's running sums leave ~1e-8 where no pixel is visible: that is none
            seen = box(visible)[where]
            seen[seen < 0.5 / k**2] = 0.0
            inside = np.broadcast_to(box(np.ones((1, h, w), np.float32)), where.shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                share = seen / inside[where]
                mean = box(visible_lst)[where] / seen
                columns += [share, mean]
                for s in scaled:
                    offset = box(visible_lst - s * visible)[where] / seen
                    columns += [offset, s[where] + offset]
        out = np.stack(columns, axis=1).astype(np.float32)
        out[~np.isfinite(out)] = np.nan  # no visible neighbour: missing
        return out

    def pixels(
        self, batches: Iterator[tuple], total: int, limit: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Features and targets of a seeded subsample of at most `limit` of the `total` pixels
        to fill in `batches` (in their order), and the windows seen."""
        rng = np.random.default_rng([seed, 7])
        chosen = np.sort(rng.choice(total, min(limit, total), replace=False))
        xs, ys, offset, windows = [], [], 0, 0
        for x, y, mask in batches:
            windows += len(x)
            flat = mask.reshape(-1) > 0
            n = int(flat.sum())
            lo, hi = np.searchsorted(chosen, [offset, offset + n])
            if hi > lo:
                keep = np.zeros(n, bool)
                keep[chosen[lo:hi] - offset] = True
                where = np.zeros_like(flat)
                where[np.flatnonzero(flat)[keep]] = True
                where = where.reshape(mask.shape)
                xs.append(self.features(x, where))
                ys.append(y[where])
            offset += n
        if not xs:
            raise ValueError("no pixel to fill in the part")
        return np.concatenate(xs), np.concatenate(ys), windows

    # --- the case ---------------------------------------------------------------------------

    def fit(self) -> None:
        from threadpoolctl import threadpool_limits

        p, context = self.params, self.context
        targets = context.task.windows.targets
        train = context.stream("train")
        # the stall's compute: the same features on resident windows, the same share of pixels
        share = min(1.0, int(p["max_samples"]) / max(targets["train"], 1))
        rng = np.random.default_rng([context.seed, 8])
        with context.probing(
            lambda b: self.features(b[0], (b[2] > 0) & (rng.random(b[2].shape) < share)),
            context.resident_batches(train),
            planned_steps=train.steps_per_epoch(),
        ):
            x, y, windows = self.pixels(
                context.timed_batches(train, 0),
                targets["train"],
                int(p["max_samples"]),
                context.seed,
            )
        val = context.stream("val", shuffle=False)
        xv, yv, _ = self.pixels(
            val.batches(0), targets["val"], int(p["max_val_samples"]), context.seed + 1
        )
        start = time.perf_counter()
        with threadpool_limits(context.threads):
            self.model.fit(x, y, X_val=xv, y_val=yv)
        seconds = time.perf_counter() - start
        context.train_samples = windows
        log_boosting_curve(context, self.model, seconds, records=RECORDS, pixels=float(len(y)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """`[B, t, h, w]`: the model where LST is not visible, the visible LST elsewhere."""
        from threadpoolctl import threadpool_limits

        b, _, h, w = x.shape
        planes = x.reshape(b, self.steps, -1, h, w)
        out = planes[:, :, self.visible_lst].copy()
        gaps = planes[:, :, self.visible] < 0.5
        if gaps.any():
            with threadpool_limits(self.context.threads):
                out[gaps] = self.model.predict(self.features(x, gaps))
        return out
