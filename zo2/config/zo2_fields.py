"""ZO2's ``ZOConfig`` fields, and what each means in zo2.

ZO2's scripts pass fields zo2 names differently (``zo_method``), or knobs of ZO2's own implementation
(``overlap``, ``amp``, ``compute_module_optimize_method``, ...). Each row of :data:`ZO2_FIELDS` says how
such a field is read from and written to a :class:`~zo2.config.ZOConfig`: a value that maps is written
to zo2's own field (which stays the one owner of the setting), a value zo2 cannot honour raises
:class:`ZO2FieldError` naming what to use instead. Nothing here is stored twice.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


class ZO2FieldError(ValueError):
    """A ZO2 field holds a value zo2 cannot honour; the message says what to use instead."""


def _dtype_name(value: Any) -> str:
    return str(value).replace("torch.", "")


def _refuse(name: str, value: Any, fix: str) -> ZO2FieldError:
    return ZO2FieldError(f"ZOConfig.{name}={value!r} (a ZO2 field) cannot be honoured by zo2: {fix}")


def _set_method(config: Any, value: Any) -> None:
    config.method = value


def _set_overlap(config: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise _refuse("overlap", value, "use True or False")
    # overlap is the prefetch of the next block while one computes: num_slots - 1 blocks upload ahead
    config.num_slots = max(config.num_slots, 2) if value else 1


def _set_amp(config: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise _refuse("amp", value, "use True or False")
    if value and config.storage_dtype is None:
        config.storage_dtype = "float16"  # ZO2's default precision_on_offloading_device
    elif not value:
        config.storage_dtype = None


def _set_offloading_precision(config: Any, value: Any) -> None:
    if config.storage_dtype is None:
        logger.warning("ZOConfig.precision_on_offloading_device=%s is ignored without amp=True (as in ZO2)", value)
        return
    config.storage_dtype = _dtype_name(value)


def _compute_precision_setter(name: str) -> Callable[[Any, Any], None]:
    def check(config: Any, value: Any) -> None:
        if config.storage_dtype is None:
            logger.warning("ZOConfig.%s=%s is ignored without amp=True (as in ZO2)", name, value)
            return
        if _dtype_name(value) != config.storage_dtype:
            raise _refuse(name, value, f"zo2 computes in the masters' dtype ({config.storage_dtype}) and does not "
                          f"upcast offloaded blocks; set storage_dtype='{_dtype_name(value)}' (or "
                          f"precision_on_offloading_device={value}) to store and compute in {_dtype_name(value)}")
    return check


def _only(name: str, accepted: tuple[Any, ...], fix: str) -> Callable[[Any, Any], None]:
    def check(config: Any, value: Any) -> None:
        if value not in accepted:
            raise _refuse(name, value, fix)
    return check


@dataclass(frozen=True)
class ZO2Field:
    """How one ZO2 field is read from and written to a ZOConfig."""

    read: Callable[[Any], Any]
    write: Callable[[Any, Any], None]
    meaning: str
    """What the field means in zo2 (the migration guide lists these)."""


ZO2_FIELDS: dict[str, ZO2Field] = {
    "zo_method": ZO2Field(lambda c: c.method, _set_method, "``method``"),
    "overlap": ZO2Field(lambda c: c.num_slots > 1, _set_overlap,
                        "``num_slots``: True prefetches the next block while one computes (``num_slots >= 2``), "
                        "False uploads each block when it is needed (``num_slots=1``)"),
    "amp": ZO2Field(lambda c: c.storage_dtype is not None, _set_amp,
                    "``storage_dtype``: True stores the masters in ``precision_on_offloading_device`` "
                    "(float16 by default), False keeps the model's dtype"),
    "precision_on_offloading_device": ZO2Field(lambda c: c.torch_storage_dtype, _set_offloading_precision,
                                               "``storage_dtype`` (with ``amp=True``)"),
    "precision_on_working_device": ZO2Field(lambda c: c.torch_storage_dtype,
                                            _compute_precision_setter("precision_on_working_device"),
                                            "must equal the storage dtype: zo2 computes in the masters' dtype"),
    "amp_precision": ZO2Field(lambda c: c.torch_storage_dtype, _compute_precision_setter("amp_precision"),
                              "must equal the storage dtype: zo2 runs no autocast"),
    "amp_compress_method": ZO2Field(lambda c: "naive", _only(
        "amp_compress_method", ("naive",), "only 'naive' (a plain cast to the storage dtype) exists"),
        "``'naive'`` only: masters are cast to ``storage_dtype``"),
    "compute_module_optimize_method": ZO2Field(lambda c: "", _only(
        "compute_module_optimize_method", ("",), "zo2 wraps the model's modules itself and does not run "
        "torch.compile on them; leave it ''"), "``''`` only (no torch.compile)"),
    "compute_function_optimize_method": ZO2Field(lambda c: "", _only(
        "compute_function_optimize_method", ("",), "zo2 does not script functions with torch.jit; leave it ''"),
        "``''`` only (no torch.jit.script)"),
    "communicate_optimize_method": ZO2Field(lambda c: "bucket", _only(
        "communicate_optimize_method", ("", "bucket"), "use '' or 'bucket'"),
        "``''`` or ``'bucket'``: zo2 always moves a block as one flat buffer (one copy per transfer)"),
    "debug_mode": ZO2Field(lambda c: False, _only(
        "debug_mode", (False,), "zo2 has no noise-free mode; to run the pipeline without changing the weights "
        "set lr=0"), "``False`` only (zo2 has no noise-free mode; ``lr=0`` leaves the weights unchanged)"),
}
"""ZO2 field -> how zo2 reads and writes it (in this order: ``amp`` before the precisions it enables).
Reading one returns zo2's setting in ZO2's terms."""


def accepts_zo2_fields(cls: type) -> type:
    """Class decorator of a config dataclass: its constructor and attributes also take ZO2's fields
    (:data:`ZO2_FIELDS`), and every field set after construction is validated at once (``cls.validate``):
    an invalid value is refused and the previous one kept."""
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        zo2_values = {name: kwargs.pop(name) for name in list(kwargs) if name in ZO2_FIELDS}
        if "zo_method" in zo2_values and "method" not in kwargs:  # so the method's defaults are resolved for it
            kwargs["method"] = zo2_values.pop("zo_method")
        dataclass_init(self, *args, **kwargs)
        object.__setattr__(self, "_constructed", True)
        for name, field in ZO2_FIELDS.items():
            if name in zo2_values:
                field.write(self, zo2_values[name])

    def __getattr__(self: Any, name: str) -> Any:  # only called for names that are not attributes
        if name in ZO2_FIELDS:
            return ZO2_FIELDS[name].read(self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if name in ZO2_FIELDS:
            ZO2_FIELDS[name].write(self, value)
            return
        state = self.__dict__
        if not state.get("_constructed") or state.get("_validating") or name not in cls.__dataclass_fields__:
            object.__setattr__(self, name, value)
            return
        previous = state[name]
        object.__setattr__(self, name, value)
        state["_validating"] = True  # validate() normalises fields by setting them: no recursion
        try:
            self.validate()
        except Exception:
            object.__setattr__(self, name, previous)
            raise
        finally:
            state["_validating"] = False

    cls.__init__, cls.__getattr__, cls.__setattr__ = __init__, __getattr__, __setattr__
    return cls
