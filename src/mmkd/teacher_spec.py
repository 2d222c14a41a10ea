"""What a config's ``teacher:`` names, parsed once: a model, a teacher cache, an ensemble of either, or none.

The ``cache:DIR`` syntax lives here and nowhere else, so the rest of mmkd asks a typed spec (``spec.cached``,
``spec.folders``) instead of testing strings. Parsing never fails: an empty cache folder or a mixed ensemble is
parsed as written and refused, naming its key, by ``mmkd.config``'s checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_PREFIX = "cache:"


@dataclass(frozen=True)
class ModelTeacher:
    """A teacher model run online: a folder, a hub id or ``open_clip:FOLDER[?tokenizer=T]``."""

    name: str

    @property
    def value(self) -> str:
        return self.name

    @property
    def members(self) -> tuple[Member, ...]:
        return (self,)


@dataclass(frozen=True)
class CacheTeacher:
    """Targets read from a teacher cache written by ``mmkd cache`` (``cache:DIR``); no model is loaded."""

    folder: str

    @property
    def value(self) -> str:
        return cache_value(self.folder)

    @property
    def members(self) -> tuple[Member, ...]:
        return (self,)


Member = ModelTeacher | CacheTeacher


@dataclass(frozen=True)
class Ensemble:
    """Several teachers (``teacher: [A, B]``): all models or all caches (``mmkd.config`` refuses a mix)."""

    members: tuple[Member, ...]

    @property
    def value(self) -> list[str]:
        return [m.value for m in self.members]


@dataclass(frozen=True)
class NoTeacher:
    """No teacher: every objective is a task loss (training from scratch)."""

    @property
    def value(self) -> str:
        return ""

    @property
    def members(self) -> tuple[Member, ...]:
        return ()


TeacherSpec = NoTeacher | ModelTeacher | CacheTeacher | Ensemble


def cache_value(folder: str | Path) -> str:
    """The config value that names the teacher cache in ``folder``."""
    return f"{CACHE_PREFIX}{folder}"


def parse_member(value: str) -> Member:
    """One teacher: ``cache:DIR`` or a model."""
    return CacheTeacher(value[len(CACHE_PREFIX):]) if value.startswith(CACHE_PREFIX) else ModelTeacher(value)


def parse_teacher(value: str | Sequence[str] | None) -> TeacherSpec:
    """The spec of a ``teacher:`` value (a string or a list; empty or None: no teacher)."""
    if isinstance(value, str) or value is None:
        return parse_member(value) if value else NoTeacher()
    members = tuple(parse_member(v) for v in value)
    return members[0] if len(members) == 1 else Ensemble(members)


def is_cached(spec: TeacherSpec) -> bool:
    """Whether a run reads its targets from teacher caches (its first member is one; a run is built from it)."""
    return bool(spec.members) and isinstance(spec.members[0], CacheTeacher)


def cache_folder(value: str | Sequence[str] | None) -> str | None:
    """The folder of ``teacher: cache:DIR`` (of the first member of an ensemble), or None for a model or none."""
    spec = parse_teacher(value)
    first = spec.members[0] if spec.members else None
    return first.folder if isinstance(first, CacheTeacher) else None


def short_name(value: str) -> str:
    """A teacher's folder name without the cache prefix (what tells teachers apart in a run's name)."""
    member = parse_member(value)
    return Path(member.folder if isinstance(member, CacheTeacher) else member.name).name
