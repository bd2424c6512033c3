"""Errors that are the user's to fix: the CLI prints them on one line and exits with 2."""


class CubebenchError(Exception):
    """A problem with the user's input (path, cube, task), not a bug in cubebench."""


class CubeError(CubebenchError):
    """The cube cannot be opened or does not have the expected schema."""


class TaskError(CubebenchError):
    """The task cannot be prepared on this cube (nothing to train on, empty split part...)."""


class ChunkReadError(CubeError):
    """A stored chunk cannot be read or decoded (truncated, garbage, unreachable)."""
