"""The loader per chunk layout and adapter, on the `small` synthetic cube: pixels
(`lst-from-t2m`, `Loader*`) and windows (`lst-gapfill`, `PatchLoader*`).

`time_epoch` / `peakmem_epoch` time one training epoch through the adapter after a warm-up
epoch (kernels compiled, tf.data traced). The `track_*` numbers come from one
`bench_loader` row per parameter set: the ratio to raw decode measured in the same run (the
figure the loader issue gates on) and the exact costs per epoch, which do not depend on the
machine and so gate CI with no noise.
"""

from __future__ import annotations

from benchmarks import LOADER_LAYOUTS, LOADER_PRESET, SEED, THREADS, CubeBenchmark, cube_path, memo

ADAPTERS = ("numpy", "torch", "tf")
# the split kinds the counters cover: physical blocks (the default), time periods (cut in the
# task's fractions) and whole chunks (the fastest, layout-dependent)
SPLITS = ("blocks", "time", "chunks")
EPOCHS = 3  # for the bench_loader row: the fewest (reference, loader) pairs the ratio uses
MAX_SECONDS = 10.0  # ... and more until its 95 % interval is within ±10 % or this long
BATCH = 4096  # pixels
PATCH_BATCH = 32  # windows


def _task(cubes: str, layout: str, task: str, split: str | None = None):
    from cubebench.cube import open_cube
    from cubebench.task import get_task, prepare_task, with_split

    cube = open_cube(cube_path(cubes, LOADER_PRESET, layout))
    return prepare_task(with_split(get_task(task), split), cube)


class LoaderEpoch(CubeBenchmark):
    """One epoch of the training part through the adapter."""

    task, batch = "lst-from-t2m", BATCH
    params = (LOADER_LAYOUTS, ADAPTERS)
    param_names = ("layout", "adapter")
    number = 1  # one epoch per sample; setup warms up before each sample
    repeat = (1, 5, 60.0)
    warmup_time = 0.0

    def setup(self, cubes: str, layout: str, adapter: str) -> None:
        from cubebench.loading import open_stream
        from cubebench.loading.bench import epoch_runner

        task = _task(cubes, layout, self.task)
        stream = open_stream(task, "train", batch_size=self.batch, threads=THREADS, seed=SEED)
        self.epoch = epoch_runner(adapter, stream)
        self.epoch(0)

    def time_epoch(self, cubes: str, layout: str, adapter: str) -> None:
        self.epoch(1)

    def peakmem_epoch(self, cubes: str, layout: str, adapter: str) -> None:
        self.epoch(1)


class PatchLoaderEpoch(LoaderEpoch):
    """One epoch of the training windows of `lst-gapfill` through the adapter."""

    task, batch = "lst-gapfill", PATCH_BATCH


class LoaderCosts(CubeBenchmark):
    """What the loader costs against raw decode, from one `bench_loader` row per layout,
    adapter and split kind: a split that does not follow the chunks makes each part decode
    chunks it shares with others (read amplification > 1)."""

    task, batch = "lst-from-t2m", BATCH
    params = (LOADER_LAYOUTS, ADAPTERS, SPLITS)
    param_names = ("layout", "adapter", "split")

    def _row(self, cubes: str, layout: str, adapter: str, split: str) -> dict:
        def compute() -> dict:
            import inspect

            from cubebench.loading.bench import bench_loader

            # the gate runs these benchmarks on BASE's src too, which may stop after `epochs`
            stopping = {"max_seconds": MAX_SECONDS}
            if "max_seconds" not in inspect.signature(bench_loader).parameters:
                stopping = {}
            return bench_loader(
                _task(cubes, layout, self.task, split),
                batch_size=self.batch,
                adapter=adapter,
                epochs=EPOCHS,
                threads=THREADS,
                **stopping,
            )

        return memo(cubes, f"loader-{self.task}-{layout}-{adapter}-{split}", compute)

    def track_ratio_to_raw(self, cubes: str, layout: str, adapter: str, split: str) -> float:
        return self._row(cubes, layout, adapter, split)["ratio_to_raw"]

    track_ratio_to_raw.unit = "loader / raw decode"

    def track_read_amplification(self, cubes: str, layout: str, adapter: str, split: str) -> float:
        return self._row(cubes, layout, adapter, split)["read_amplification"]

    track_read_amplification.unit = "bytes decoded / bytes of the part"

    def track_chunks_decoded(self, cubes: str, layout: str, adapter: str, split: str) -> float:
        row = self._row(cubes, layout, adapter, split)
        return row["chunks_decoded"] / row["epochs"]

    track_chunks_decoded.unit = "chunks per epoch"

    def track_bytes_read(self, cubes: str, layout: str, adapter: str, split: str) -> float:
        row = self._row(cubes, layout, adapter, split)
        return row["bytes_read"] / row["epochs"]

    track_bytes_read.unit = "bytes per epoch"


class PatchLoaderCosts(LoaderCosts):
    """What the window loader of `lst-gapfill` costs against raw decode of its chunks."""

    task, batch = "lst-gapfill", PATCH_BATCH


class AcceleratorFeed(CubeBenchmark):
    """How fast an accelerator one loader keeps busy: the highest emulated rate (samples/s,
    pixels or windows) held at >= 90 % accelerator utilisation (`bench-loader --emulate-rate
    sweep`), per task and decode threads, on the balanced layout through the numpy adapter."""

    params = (("lst-from-t2m", "lst-gapfill"), (1, 2))
    param_names = ("task", "threads")

    def track_sustained_rate_at_90(self, cubes: str, task: str, threads: int) -> float:
        def compute() -> dict:
            from cubebench.loading.bench import sweep

            batch = BATCH if task == "lst-from-t2m" else PATCH_BATCH
            return sweep(_task(cubes, "balanced", task), batch_size=batch, threads=threads)

        return memo(cubes, f"feed-{task}-{threads}", compute)["sustained_rate_at_90"]

    track_sustained_rate_at_90.unit = "samples/s at 90 % utilisation"
