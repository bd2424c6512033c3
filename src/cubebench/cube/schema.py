"""ESDC naming: canonical variable names, known aliases, unit profiles and schema checks.

Canonical names are those of ESDC v2.1.1. ESDC v3 keeps most names but stores air temperature
in degrees Celsius and has no land surface temperature; other tools use short names (t2m, lst).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import xarray as xr

from cubebench.errors import CubeError

DIMS = ("time", "lat", "lon")

# canonical name -> other names seen in public cubes and common tools
VARIABLE_ALIASES: dict[str, tuple[str, ...]] = {
    "air_temperature_2m": ("t2m", "2m_temperature", "tas", "air_temperature"),
    "land_surface_temperature": ("lst", "LST", "land_surface_temperature_day"),
    "root_moisture": ("root_zone_soil_moisture", "SMroot", "smroot"),
}
COORD_ALIASES: dict[str, tuple[str, ...]] = {
    "lat": ("latitude", "y"),
    "lon": ("longitude", "x"),
    "time": ("t", "date"),
}


@dataclass(frozen=True)
class VariableInfo:
    units: str
    long_name: str
    standard_name: str


@dataclass(frozen=True)
class Profile:
    """How one ESDC version names and stores the variables the synthetic cube writes."""

    name: str
    esdc_version: str
    variables: dict[str, VariableInfo]
    celsius: frozenset[str]  # variables stored in degC instead of K


_T2M_K = VariableInfo("K", "2 metre air temperature", "air_temperature")
_T2M_C = VariableInfo("degC", "2 metre air temperature", "air_temperature")
_LST = VariableInfo("K", "land surface temperature", "surface_temperature")
_ROOT = VariableInfo(
    "m3 m-3", "root-zone soil moisture", "volume_fraction_of_condensed_water_in_soil"
)

PROFILES: dict[str, Profile] = {
    "esdc-2.1.1": Profile(
        "esdc-2.1.1",
        "2.1.1",
        {
            "air_temperature_2m": _T2M_K,
            "land_surface_temperature": _LST,
            "root_moisture": _ROOT,
        },
        frozenset(),
    ),
    # ESDC v3 has no land surface temperature and stores air temperature in degC.
    "esdc-3": Profile(
        "esdc-3",
        "3.0.1",
        {"air_temperature_2m": _T2M_C, "root_moisture": _ROOT},
        frozenset({"air_temperature_2m"}),
    ),
}


def _first_present(names: tuple[str, ...], present: set[str]) -> str | None:
    return next((n for n in names if n in present), None)


def canonicalize(ds: xr.Dataset) -> xr.Dataset:
    """Rename known aliases of coordinates and variables to the canonical ESDC names."""
    present = set(ds.variables)
    renames: dict[str, str] = {}
    for table in (COORD_ALIASES, VARIABLE_ALIASES):
        for canonical, aliases in table.items():
            if canonical in present:
                continue
            alias = _first_present(aliases, present)
            if alias is not None:
                renames[alias] = canonical
    if renames:
        ds = ds.rename(renames)
        # fast chunk readers address the store by the stored names
        ds.attrs["cubebench_stored_names"] = json.dumps({c: a for a, c in sorted(renames.items())})
    return ds


def require_variable(ds: xr.Dataset, name: str) -> xr.DataArray:
    """The variable `name` as a float (time, lat, lon) array, or a CubeError saying what exists."""
    if name not in ds.data_vars:
        aliases = VARIABLE_ALIASES.get(name, ())
        tried = f" (aliases tried: {', '.join(aliases)})" if aliases else ""
        available = ", ".join(sorted(map(str, ds.data_vars))) or "none"
        raise CubeError(f"variable {name!r} not in cube{tried}; available: {available}")
    da = ds[name]
    if set(da.dims) != set(DIMS) or da.ndim != 3:
        raise CubeError(f"variable {name!r} has dims {tuple(map(str, da.dims))}; expected {DIMS}")
    if not np.issubdtype(da.dtype, np.floating):
        raise CubeError(
            f"variable {name!r} has dtype {da.dtype}; expected a floating type "
            "(NaN marks missing values)"
        )
    return da.transpose(*DIMS)
