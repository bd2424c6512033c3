"""Cube access: synthetic ESDC-like cubes, local and remote Zarr/NetCDF, schema checks."""

from cubebench.cube.access import SyntheticSpec, make_cube, open_cube
from cubebench.cube.fingerprint import cube_fingerprint
from cubebench.cube.schema import DIMS, PROFILES, VARIABLE_ALIASES, require_variable
from cubebench.cube.synthetic import LAYOUTS, PRESETS, lst_oracle, season_angle

__all__ = [
    "DIMS",
    "LAYOUTS",
    "PRESETS",
    "PROFILES",
    "VARIABLE_ALIASES",
    "SyntheticSpec",
    "cube_fingerprint",
    "lst_oracle",
    "make_cube",
    "open_cube",
    "require_variable",
    "season_angle",
]
