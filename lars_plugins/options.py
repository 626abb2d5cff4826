"""The options of the layer-wise optimizers: each declared once (:class:`Option`: the check every
value passes, and the default), the checks themselves, and other libraries' names for them
(:data:`FOREIGN_KEYS`), refused in our constructors and translated where that library's vocabulary
arrives (the timm factory, HF ``optim_args``, loaded checkpoints)."""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, TypeGuard

from torch import Tensor

__all__ = ["Option", "is_foreign_number", "Check", "ForeignKey", "FOREIGN_KEYS", "EXCLUSION_OPTIONS", "SHORT_FORMS",
           "meant_key", "translate_foreign", "real", "flag", "learning_rate", "pair", "choice"]

# check(where, key, value) raises a ValueError/TypeError naming the key and what it accepts.
Check = Callable[[str, str, Any], None]


def real(low: float = 0.0, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A real number in the range given (finite)."""

    def check(where: str, key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where}{key} must be a real number, got {type(value).__name__} {value!r}")
        value = float(value)
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high or not math.isfinite(value):
            low_text = f"> {low}" if low_open else f">= {low}"
            high_text = " and finite" if high == math.inf else f" and {'<' if high_open else '<='} {high}"
            raise ValueError(f"{where}{key} must be {low_text}{high_text}, got {value}")

    check.is_number = True  # type: ignore[attr-defined]
    return check


def flag(optional: bool = False) -> Check:
    """A bool (or ``None`` where ``optional``)."""

    def check(where: str, key: str, value: Any) -> None:
        if optional and value is None:
            return
        if not isinstance(value, bool):
            allowed = "True, False or None" if optional else "a bool"
            raise TypeError(f"{where}{key} must be {allowed}, got {value!r}")

    return check


def choice(*allowed: str) -> Check:
    """One of the strings ``allowed``."""

    def check(where: str, key: str, value: Any) -> None:
        if not isinstance(value, str) or value not in allowed:
            names = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"{where}{key} must be one of {names}, got {value!r}")

    return check


def learning_rate() -> Check:
    """A number ``>= 0`` or a 0-d tensor holding one (read once, here, never in ``step()``)."""
    number = real()

    def check(where: str, key: str, value: Any) -> None:
        if isinstance(value, Tensor):
            if value.ndim != 0:
                raise ValueError(f"{where}{key} must be a number or a 0-d tensor, got shape {tuple(value.shape)}; "
                                 f"pass {key}.reshape(()) for a one-element tensor")
            value = float(value)
        number(where, key, value)

    check.is_number = True  # type: ignore[attr-defined]
    return check


def pair(item: Check, *, optional: bool = False, ordered: bool = False) -> Check:
    """A 2-sequence of numbers each passing ``item`` (``None`` where ``optional``; ``a <= b`` where ``ordered``)."""

    def check(where: str, key: str, value: Any) -> None:
        if optional and value is None:
            return
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise TypeError(f"{where}{key} must be a pair of numbers{' or None' if optional else ''}, got {value!r}")
        for k, v in enumerate(value):
            item(where, f"{key}[{k}]", v)
        if ordered and value[0] > value[1]:
            raise ValueError(f"{where}{key} must have {key}[0] <= {key}[1], got {tuple(value)}")

    check.is_pair = True  # type: ignore[attr-defined]
    return check


def is_foreign_number(value: Any) -> TypeGuard[numbers.Real]:
    """Whether ``value`` is a real number that is not a Python ``bool``, ``int`` or ``float`` (a NumPy
    scalar: ``numpy.float64`` subclasses ``float``, but a checkpoint holding one does not load under
    ``torch.load(weights_only=True)``), so an optimizer stores it as a Python number."""
    return isinstance(value, numbers.Real) and type(value) not in (bool, int, float)


@dataclass(frozen=True)
class ForeignKey:
    """Another library's name for one of our keywords: ``ours``, whose library, and how its value
    becomes ours (``convert``; ``None`` where no value converts faithfully: then it is refused)."""

    ours: str
    library: str
    convert: Optional[Callable[[Any], Any]] = lambda value: value
    how: str = ""  # what the conversion is, for messages


# Short forms people write for our keys (from other libraries' and papers' vocabularies).
SHORT_FORMS = {"wd": "weight_decay", "weight_decay_rate": "weight_decay", "epsilon": "eps", "beta1": "betas",
               "beta2": "betas", "b1": "betas", "b2": "betas", "mom": "momentum", "coef": "trust_coefficient",
               "coeff": "trust_coefficient", "trust_coef": "trust_coefficient", "nesterov_momentum": "nesterov"}


def meant_key(key: str, ours: Iterable[str]) -> list[str]:
    """Our keys that ``key`` looks like a try at: a short form (``wd``), an abbreviation (a prefix
    of three letters or more: ``trust_coef``, ``mom``), or a misspelling; none for unrelated keys
    (``initial_lr``, ``lr_scale``, ``name``), which a group may carry."""
    ours = list(ours)
    if SHORT_FORMS.get(key) in ours:
        return [SHORT_FORMS[key]]
    if len(key) >= 3:
        prefixed = [k for k in ours if k.startswith(key)]
        if prefixed:
            return prefixed
    return difflib.get_close_matches(key, ours, n=1, cutoff=0.85)


def _negated(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be a bool, got {value!r}")
    return not value


# The one table of other libraries' names, read wherever keywords arrive: refused with our name in
# our own constructors and groups (a foreign key there would otherwise be silently ignored);
# translated where people bring that library's vocabulary: the timm factory, HF ``optim_args``
# and loaded checkpoints. An entry applies to an optimizer that has its ``ours`` key.
FOREIGN_KEYS: dict[str, ForeignKey] = {
    "trust_coeff": ForeignKey("trust_coefficient", "timm"),
    "eta": ForeignKey("trust_coefficient", "LARC"),
    "clip": ForeignKey("trust_clip", "LARC"),
    "always_adapt": ForeignKey("exclude_bias_and_norm", "timm", _negated,
                               "always_adapt=True is exclude_bias_and_norm=False"),
    "clamp_value": ForeignKey("weight_norm_bounds", "pytorch-optimizer", lambda value: (0.0, value),
                              "clamp_value=c is weight_norm_bounds=(0, c)"),
    "lars_exclude": ForeignKey("exclude", "pre-release lars_plugins"),
    # Name patterns or predicates elsewhere; here exclusion is a per-group bool (see param_groups).
    "exclude_from_adaptation": ForeignKey("exclude", "BYOL/VICReg recipes", None),
    "lars_adaptation_filter": ForeignKey("exclude", "SimCLR", None),
    "exclude_from_layer_adaptation": ForeignKey("exclude", "TF/NVIDIA LAMB", None),
}


def foreign_message(where: str, name: str, foreign: ForeignKey, owner: str) -> str:
    how = f" ({foreign.how})" if foreign.how else ""
    if foreign.convert is None:
        how = " (a per-group True/False/None here: lars_plugins.param_groups builds such groups)"
    return f"{where}{name!r} is {foreign.library}'s name; {owner} calls it {foreign.ours!r}{how}"


def translate_foreign(keywords: Mapping[str, Any], accepted: Iterable[str], *, where: str = "",
                      owner: str = "lars_plugins") -> dict[str, Any]:
    """``keywords`` with other libraries' names (:data:`FOREIGN_KEYS`) for keys in ``accepted``
    replaced by ours and their values converted. A name given in both forms, or one whose value has
    no faithful conversion, is a ``TypeError`` naming both."""
    accepted = set(accepted)
    out = dict(keywords)
    for name in list(out):
        foreign = FOREIGN_KEYS.get(name) if isinstance(name, str) else None
        if foreign is None or foreign.ours not in accepted:
            continue
        if foreign.convert is None:
            raise TypeError(foreign_message(where, name, foreign, owner))
        if foreign.ours in out:
            raise TypeError(f"{where}give {name!r} ({foreign.library}'s name) or {foreign.ours!r}, not both")
        try:
            out[foreign.ours] = foreign.convert(out.pop(name))
        except TypeError as error:  # named as the caller wrote it, not by our key
            raise TypeError(f"{where}{name} {error}") from None
    return out


@dataclass(frozen=True)
class Option:
    """One keyword of a layer-wise optimizer, declared once: the check every value passes (in the
    constructor, in added groups, in loaded checkpoints), and the default, which is the
    constructor's and also the value of a checkpoint or pickle written before the key existed.
    ``keyword=False``: a group key that is not a constructor keyword (``exclude``, which groups set)."""

    check: Check
    default: Any
    keyword: bool = True


# The group keys of exclusion, which is_excluded() reads: every layer-wise optimizer declares them.
EXCLUSION_OPTIONS: dict[str, Option] = {"exclude": Option(flag(optional=True), None, keyword=False),
                                        "exclude_bias_and_norm": Option(flag(), True)}
