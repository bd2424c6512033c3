"""The synthetic cube: ESDC schema, determinism, layouts, land mask, clouds, noise floor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from cubebench.cube import lst_oracle, make_cube, open_cube
from cubebench.cube.synthetic import PRESETS, layout_chunks
from cubebench.task import get_task, prepare_task

VARS = ("air_temperature_2m", "land_surface_temperature", "root_moisture")


def _bits(da: xr.DataArray) -> np.ndarray:
    return np.asarray(da.values).view(np.uint32)


def test_schema_is_esdc_like(tiny):
    assert tuple(tiny["land_surface_temperature"].dims) == ("time", "lat", "lon")
    assert set(VARS) <= set(tiny.data_vars)
    for name in VARS:
        attrs = tiny[name].attrs
        assert attrs["units"] and attrs["long_name"] and attrs["standard_name"]
        assert tiny[name].dtype == np.float32
    assert tiny["air_temperature_2m"].attrs["units"] == "K"
    steps = np.diff(tiny["time"].values).astype("timedelta64[D]").astype(int)
    assert set(steps) == {8}  # one year: 8-daily throughout
    assert len(tiny["time"]) == 46
    lat, lon = tiny["lat"].values, tiny["lon"].values
    assert np.allclose(np.diff(lat), -4.0) and np.allclose(np.diff(lon), 4.0)  # regular, lat N->S
    assert tiny.attrs["cubebench_noise_floor"] > 0


@pytest.mark.slow  # writes the `small` cube where no cache has it
def test_8daily_axis_restarts_each_year(cube_cache):
    time = open_cube("synthetic:small")["time"].to_index()
    firsts = time[time.day_of_year == 1]
    assert list(firsts.year) == [2001, 2002, 2003, 2004]
    assert len(time) == 4 * 46


def test_same_seed_gives_identical_arrays_and_other_seed_differs(tmp_path, tiny):
    again = open_cube(str(make_cube("tiny", seed=0, output=tmp_path / "again.zarr")))
    other = open_cube(str(make_cube("tiny", seed=1, output=tmp_path / "other.zarr")))
    for name in VARS:
        np.testing.assert_array_equal(_bits(again[name]), _bits(tiny[name]))
        assert not np.array_equal(_bits(other[name]), _bits(tiny[name]), equal_nan=True)


@pytest.mark.parametrize(
    ("layout", "fmt"),
    [("map", 3), ("ts", 2), ("balanced", 2), pytest.param("5,7,11", 3, marks=pytest.mark.slow)],
)
def test_values_do_not_depend_on_layout_or_format(tmp_path, tiny, layout, fmt):
    path = make_cube("tiny", layout=layout, zarr_format=fmt, output=tmp_path / "c.zarr")
    cube = open_cube(str(path))
    expected = layout_chunks(layout, PRESETS["tiny"].shape)
    for name in VARS:
        assert tuple(c[0] for c in cube[name].chunks) == expected
        np.testing.assert_array_equal(_bits(cube[name]), _bits(tiny[name]))
    marker = "zarr.json" if fmt == 3 else ".zgroup"
    assert (path / marker).exists()


def test_storage_is_blosc_lz4_with_shuffle(tmp_path):
    path = make_cube("tiny", zarr_format=3, output=tmp_path / "v3.zarr")
    meta = json.loads((path / "land_surface_temperature" / "zarr.json").read_text())
    blosc = [c for c in meta["codecs"] if c["name"] == "blosc"]
    assert blosc and blosc[0]["configuration"]["cname"] == "lz4"
    assert blosc[0]["configuration"]["shuffle"] == "shuffle"
    path2 = make_cube("tiny", zarr_format=2, output=tmp_path / "v2.zarr")
    meta2 = json.loads((path2 / "land_surface_temperature" / ".zarray").read_text())
    assert meta2["compressor"]["id"] == "blosc" and meta2["compressor"]["cname"] == "lz4"
    assert meta2["compressor"]["shuffle"] == 1


def test_layouts_have_the_documented_shapes():
    shape = PRESETS["large"].shape
    assert shape == (460, 720, 1440)
    assert layout_chunks("map", shape) == (1, 720, 1440)
    assert layout_chunks("ts", shape) == (256, 180, 180)
    assert layout_chunks("balanced", shape) == (115, 180, 360)


def test_preset_sizes():
    def decoded_mb(name):
        return np.prod(PRESETS[name].shape) * 4 * len(VARS) / 1e6

    assert decoded_mb("tiny") <= 5
    assert 100 <= decoded_mb("small") <= 200
    assert decoded_mb("medium") >= 4 * decoded_mb("small")
    assert decoded_mb("large") >= 2000


def test_ocean_is_nan_and_land_has_data(tiny):
    lst = tiny["land_surface_temperature"]
    moisture = tiny["root_moisture"]
    # mid Pacific is ocean, central Eurasia and the Sahara are land (real coastlines)
    pacific = dict(lat=-20, lon=-130, method="nearest")
    assert lst.sel(**pacific).isnull().all() and moisture.sel(**pacific).isnull().all()
    for lat, lon in [(50, 90), (22, 10)]:
        assert moisture.sel(lat=lat, lon=lon, method="nearest").notnull().all()
        assert lst.sel(lat=lat, lon=lon, method="nearest").notnull().any()
    # air temperature comes from a reanalysis in the ESDC: defined over the ocean too
    assert tiny["air_temperature_2m"].notnull().all()


@pytest.mark.slow  # on the `small` cube
def test_cloud_gaps_cover_30_to_50_percent_of_land_and_are_correlated(cube_cache):
    cube = open_cube("synthetic:small")
    lst = cube["land_surface_temperature"].values
    land = np.isfinite(cube["root_moisture"].values[0])
    gap = ~np.isfinite(lst)
    gap_land = gap[:, land]
    fraction = gap_land.mean()
    assert 0.30 <= fraction <= 0.50
    # neighbours (east and next time step) of a gap are gaps far more often than by chance
    both_land = land[:, 1:] & land[:, :-1]
    east = (gap[:, :, 1:] & gap[:, :, :-1])[:, both_land].mean() / gap[:, :, :-1][
        :, both_land
    ].mean()
    later = (gap[1:] & gap[:-1])[:, land].mean() / gap[:-1][:, land].mean()
    assert east > fraction + 0.25
    assert later > fraction + 0.1


def test_v3_profile_has_celsius_and_no_lst(tiny):
    v3 = open_cube("synthetic:tiny?profile=esdc-3")
    assert v3["air_temperature_2m"].attrs["units"] == "degC"
    assert "land_surface_temperature" not in v3
    assert "cubebench_noise_floor" not in v3.attrs
    np.testing.assert_allclose(
        v3["air_temperature_2m"].values + 273.15, tiny["air_temperature_2m"].values, atol=1e-4
    )


@pytest.mark.slow  # on the `small` cube
def test_oracle_reaches_the_noise_floor_on_the_test_part(cube_cache):
    """The stored floor is real: knowing the generating function gives exactly that RMSE."""
    cube = open_cube("synthetic:small")
    task = prepare_task(get_task("lst-from-t2m"), cube)
    x, y = task.load_part("test")
    assert len(y) > 100_000
    t2m, lat, sin_doy, cos_doy = x.T
    predicted = lst_oracle(t2m, lat, np.arctan2(sin_doy, cos_doy))
    rmse = float(np.sqrt(np.mean((predicted - y) ** 2)))
    floor = task.noise_floor
    assert floor == cube.attrs["cubebench_noise_floor"]
    assert abs(rmse / floor - 1) < 0.02
    # and the problem is not trivial: predicting LST = T2m is far worse than the floor
    assert np.sqrt(np.mean((t2m - y) ** 2)) > 3 * floor


def test_north_and_south_follow_different_regimes(tiny):
    """A linear model fitted on the north transfers worse to the south than one fitted there."""
    task = prepare_task(get_task("lst-from-t2m-transfer"), tiny)

    def design(x):
        return np.column_stack([x, x[:, :1] ** 2, np.ones(len(x))])

    xs, ys = task.load_part("train")
    xt, yt = task.load_part("target_train")
    coef_source = np.linalg.lstsq(design(xs), ys, rcond=None)[0]
    coef_target = np.linalg.lstsq(design(xt), yt, rcond=None)[0]

    def rmse(coef):
        return np.sqrt(np.mean((design(xt) @ coef - yt) ** 2))

    assert rmse(coef_source) > 1.5 * rmse(coef_target)


def test_a_cube_written_by_another_tool_opens_and_prepares(tmp_path, tiny):
    foreign = tiny.compute().copy()
    foreign.attrs = {}
    for name in foreign.variables:
        foreign[name].attrs = {}
        foreign[name].encoding = {}
    foreign = foreign.rename({"air_temperature_2m": "t2m", "lat": "latitude", "lon": "longitude"})
    foreign.chunk({"time": 23, "latitude": 15, "longitude": 30}).to_zarr(
        tmp_path / "foreign.zarr", zarr_format=2, consolidated=True
    )
    cube = open_cube(str(tmp_path / "foreign.zarr"))
    task = prepare_task(get_task("lst-from-t2m"), cube)
    assert task.noise_floor is None
    assert task.chunk_shape == (23, 15, 30)
    assert sum(task.samples.values()) == int(np.isfinite(tiny["land_surface_temperature"]).sum())


def test_netcdf_file_opens_with_same_values(tmp_path, tiny):
    path = tmp_path / "tiny.nc"
    tiny.compute().to_netcdf(path, engine="h5netcdf")
    cube = open_cube(str(path))
    for name in VARS:
        np.testing.assert_array_equal(_bits(cube[name]), _bits(tiny[name]))
    task = prepare_task(get_task("lst-from-t2m"), cube)
    assert all(n > 0 for n in task.samples.values())


@pytest.mark.parametrize("fmt", [2, 3])
def test_cubes_are_written_with_consolidated_metadata(tmp_path, cube_cache, fmt):
    """As the ESDC's stores: one read of consolidated metadata opens the cube, and xarray
    opens it without a warning (it warns about stores without)."""
    import warnings

    path = make_cube("tiny", layout="ts", zarr_format=fmt, output=tmp_path / f"v{fmt}.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with xr.open_zarr(path) as ds:
            assert "land_surface_temperature" in ds
    if fmt == 3:
        root = json.loads((path / "zarr.json").read_text())
        assert set(root["consolidated_metadata"]["metadata"]) >= {"land_surface_temperature"}
    else:
        assert (path / ".zmetadata").is_file()
