"""Read a small YAML file defensively: every way it can be wrong becomes one clear InvalidFile."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from reconciler.kit.schemas import InvalidFile

# Our files are a few hundred bytes; a megabyte is already absurd and a 1 GB file must
# not be read into memory by a loop that runs every few seconds.
MAX_FILE_BYTES = 1 << 20
# Anchors/aliases are legal YAML but a "billion laughs" file turns a 1 KB document into
# an exponential tree once anything walks it; real config files need very few.
MAX_ALIASES = 64
MAX_DEPTH = 32


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases as it composes the document."""

    aliases_seen = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} YAML aliases (anchor bomb?)")
        return super().compose_node(parent, index)


def _depth(node: object, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(node, dict):
        return max((_depth(v, level + 1) for v in node.values()), default=level)
    if isinstance(node, list):
        return max((_depth(v, level + 1) for v in node), default=level)
    return level


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The file's bytes, refusing what is not a readable regular file of sane size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise InvalidFile(path, "is a directory, expected a YAML file") from None
    except PermissionError:
        raise InvalidFile(path, "permission denied: the reconciler cannot read it") from None
    except OSError as exc:
        raise InvalidFile(path, f"cannot open: {exc.strerror}") from None
    # fstat before fdopen: Linux opens a directory O_RDONLY, but fdopen refuses it
    # with a bare IsADirectoryError.
    try:
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InvalidFile(path, "is a directory, expected a YAML file")
        raise InvalidFile(path, "is not a regular file (fifo, socket or device?)")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InvalidFile(path, f"is larger than {limit} bytes; refusing to parse it")
    return data


def parse(data: bytes, path: Path | str) -> object:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidFile(path, f"is not UTF-8 text (byte {exc.start}): binary file?") from None
    if "\x00" in text:
        raise InvalidFile(path, "contains NUL bytes: binary file?")
    loader: _GuardedLoader | None = None
    try:
        loader = _GuardedLoader(text)  # the reader already rejects unprintable characters here
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InvalidFile(path, f"YAML syntax error at {where}{exc.problem}") from None
    except yaml.YAMLError as exc:
        raise InvalidFile(path, f"YAML error: {exc}") from None
    except RecursionError:
        raise InvalidFile(path, f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # SafeConstructor lets some bad scalars escape as plain Python errors
        # (e.g. "2001-02-30" as a timestamp, "!!int x", "!!timestamp x").
        raise InvalidFile(path, f"YAML value error: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if _depth(document) > MAX_DEPTH:
        raise InvalidFile(path, f"nested deeper than {MAX_DEPTH} levels")
    return document


def read_yaml(path: Path) -> object:
    """Parsed document; FileNotFoundError passes through (callers decide what absence means)."""
    return parse(read_bytes(path), path)
