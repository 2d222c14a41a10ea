"""Extending mmkd without editing it: a user's own objective, data format or tower architecture, registered by name.

As timm's ``register_model``/``list_models`` and torchdistill's loss registry do, a decorator (or a call) puts the
user's code into the same registries mmkd's own components live in, so a config names it like any other. A config
loads the user's module with ``plugins: [my_pkg.losses]`` (importable modules only, never file paths: importing a
module runs its code, as entry points do). Each function imports what it registers into when called, so
``import mmkd`` stays light.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict, TypeVar

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from mmkd.data.records import Record
    from mmkd.objectives.base import Objective

ObjectiveT = TypeVar("ObjectiveT", bound="type[Objective]")
Reader = Callable[..., "list[Record]"]
ReaderT = TypeVar("ReaderT", bound=Reader)
ClassNames = Callable[..., "list[str] | None"]
MODALITIES = ("image", "text")


class ObjectiveInfo(TypedDict):
    """What ``list_objectives`` says of one objective (a dict: it prints and serialises as one)."""

    params: dict[str, object]  # its tunable keyword parameters and their defaults
    uses_teacher: bool


class FormatInfo(TypedDict):
    options: list[str]  # the reader's keyword options (``FORMAT:PATH`` specs take them as config keys)
    labelled: bool  # it can name classes (zero-shot evaluation needs that)


class TowerInfo(TypedDict):
    modality: str  # "image" or "text"
    config_class: str  # the transformers config class a ``student.<tower>.config`` mapping builds


def _taken(kind: str, name: str) -> ValueError:
    return ValueError(f"{kind} {name!r} is already registered; pick another name (list_{kind.split()[-1]}s() "
                      "shows the taken ones)")


def register_objective(name: str) -> Callable[[ObjectiveT], ObjectiveT]:
    """Class decorator: ``@mmkd.register_objective("my_loss")`` on a subclass of ``mmkd.Objective``.

    Its keyword-only ``__init__`` parameters are the config's ``objectives: [{name: my_loss, params: {...}}]``
    keys; ``forward(student, teacher)`` returns named scalar terms (see ``mmkd.Objective``)."""
    from mmkd.objectives import OBJECTIVES
    from mmkd.objectives.base import Objective

    def deco(cls: ObjectiveT) -> ObjectiveT:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"register_objective({name!r}): {cls!r} is not a subclass of mmkd.Objective")
        if name in OBJECTIVES:
            raise _taken("objective", name)
        return OBJECTIVES.register(name)(cls)

    return deco


def register_format(name: str, *, class_names: ClassNames | None = None) -> Callable[[ReaderT], ReaderT]:
    """Function decorator: ``@mmkd.register_format("myformat")`` on ``read(path, **options) -> list[Record]``.

    ``data.train: myformat:PATH`` then reads with it (its keyword options are the spec's options); class_names:
    ``(path, **options) -> list[str] | None`` for a labelled set (zero-shot evaluation on it)."""
    from mmkd.data.sources import FORMATS
    from mmkd.data.sources.registry import register_format as register

    def deco(read: ReaderT) -> ReaderT:
        params = list(inspect.signature(read).parameters)
        if not params or params[0] != "path":
            raise TypeError(f"register_format({name!r}): the reader's first parameter must be 'path', got {params}")
        if name != name.strip().lower() or ":" in name or not name:
            raise ValueError(f"register_format({name!r}): a format name is lower-case, without ':' (FORMAT:PATH)")
        if name in FORMATS:
            raise _taken("format", name)
        return register(name, class_names)(read)

    return deco


def register_tower(name: str, config_class: type[PretrainedConfig], modality: str,
                   model_class: type[PreTrainedModel] | None = None) -> None:
    """A tower architecture: ``student.vision: {source: new, arch: NAME, config: {...}}`` builds
    ``model_class(config_class(**config))`` (transformers' AutoModel when ``model_class`` is None).

    The tower must answer like a transformers model (``last_hidden_state``, ``config.hidden_size``). A
    ``model_class`` is registered with transformers' AutoConfig/AutoModel too, so a saved student loads again in
    a process that has imported the plugin."""
    from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

    from mmkd.models.towers import ARCHS

    if modality not in MODALITIES:
        raise ValueError(f"register_tower({name!r}): modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if not (isinstance(config_class, type) and issubclass(config_class, PretrainedConfig)):
        raise TypeError(f"register_tower({name!r}): {config_class!r} is not a transformers PretrainedConfig class")
    if model_class is not None and not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise TypeError(f"register_tower({name!r}): {model_class!r} is not a transformers PreTrainedModel class")
    if name in ARCHS:
        raise _taken("tower", name)
    if model_class is not None:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
    ARCHS.register(name)((config_class, modality))


def list_objectives() -> dict[str, ObjectiveInfo]:
    """Every registered objective (mmkd's and plugins'): its tunable parameters with defaults, and whether it
    needs a teacher."""
    from mmkd.objectives import OBJECTIVES
    from mmkd.objectives.base import objective_params

    return {name: ObjectiveInfo(params=objective_params(OBJECTIVES.get(name)),
                                uses_teacher=bool(OBJECTIVES.get(name).uses_teacher)) for name in OBJECTIVES.names()}


def list_formats() -> dict[str, FormatInfo]:
    """Every registered data format (``FORMAT:PATH``), with its reader's options and whether it names classes."""
    from mmkd.data.sources import FORMATS

    out: dict[str, FormatInfo] = {}
    for name in FORMATS.names():
        fmt = FORMATS.get(name)
        options = [p for p in inspect.signature(fmt.read).parameters if p not in ("path", "bad")]
        out[name] = FormatInfo(options=options, labelled=fmt.class_names is not None)
    return out


def list_towers() -> dict[str, TowerInfo]:
    """Every registered tower architecture (``arch:`` of a new student tower; ``hf:<model_type>`` also works for
    any transformers vision model)."""
    from mmkd.models.towers import ARCHS

    return {name: TowerInfo(modality=ARCHS.get(name)[1], config_class=ARCHS.get(name)[0].__name__)
            for name in ARCHS.names()}
