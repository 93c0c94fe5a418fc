"""The contract between the engine and a merge method, and the method registry.

A method is a pure function ``fn(group: TensorGroup) -> torch.Tensor``. It sees the
input tensors of one output tensor (already in the compute dtype, on the compute
device, shapes checked), the parameters resolved for that tensor, and a seeded
random generator. It does no I/O and knows nothing of files or names beyond
``group.name`` (given for error messages only).

A method declares its parameters once, in its ``MethodSpec``. Recipe validation,
the dry-run plan, the docs table and the CLI's ``methods`` listing all come from
that declaration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional

import torch

REQUIRED: Any = object()


class BasePolicy(str, Enum):
    REQUIRED = "required"  # the method cannot run without a base model
    OPTIONAL = "optional"  # used when given
    IGNORED = "ignored"  # a base model, if given, is just another input


@dataclass(frozen=True)
class Param:
    """One parameter of a method, as a recipe sets it.

    ``per_model`` parameters are set under ``models[i].parameters`` (or globally,
    as a default for every model); the others are global. ``on_base`` says whether
    a per-model parameter is resolved for the base model too (e.g. ``weight`` for
    ``linear``) or only for the others (e.g. ``density`` for ``ties``).
    Bounds: ``low``/``high`` with ``*_open`` saying whether the end is excluded.
    """

    name: str
    kind: type = float  # float, int, bool or str
    default: Any = REQUIRED
    per_model: bool = False
    on_base: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[tuple[str, ...]] = None
    doc: str = ""
    # A range outside which a value still works but is probably a mistake (e.g. slerp's t
    # extrapolates beyond the two models): mergekit accepts such values, so a recipe keeps
    # running, with a warning naming the field.
    usual: Optional[tuple[float, float]] = None
    # For a global str parameter: its value names a safetensors file of per-input statistics that
    # the method reads from ``TensorGroup.stats[k][<this name>]``. The engine resolves the file at
    # plan time (``calibrate.stats_file``): entry ``"<tensor name>:<k>"`` belongs to input ``k`` of
    # that output tensor and must broadcast to its shape. The file counts as an input of the merge.
    stats_file: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """Convert a YAML scalar to this parameter's kind, or raise ValueError."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError(f"must be true or false, got {value!r}")
        if self.kind is str:
            if not isinstance(value, str):
                raise ValueError(f"must be a string, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
        if self.kind is int:
            if number != int(number):
                raise ValueError(f"must be a whole number, got {value!r}")
            return int(number)
        return number

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def unusual(self, value: Any) -> Optional[str]:
        """Why ``value`` (already coerced and in range) deserves a warning, or None."""
        if self.usual is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        lo, hi = self.usual
        if lo <= value <= hi:
            return None
        return f"is outside [{lo:g}, {hi:g}], the usual range of {self.name}; kept as given"

    def check(self, value: Any) -> Optional[str]:
        """Return why ``value`` (already coerced) is out of range, or None."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        if self.kind in (int, float):
            if not math.isfinite(value):
                return "must be finite"
            below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if below or above:
                return f"must be in {self.range_text()}"
        return None


@dataclass
class TensorGroup:
    """The inputs of one output tensor, as a method receives them.

    ``tensors`` holds every input in recipe order, the base model's too when the
    base is an input; ``base_index`` points at it (None when there is no base).
    ``model_params[i]`` holds the per-model parameters of ``tensors[i]`` (for the
    base only those with ``on_base``). ``params`` holds the global ones.
    A method must not modify ``tensors`` unless ``disposable`` is set.
    """

    name: str
    tensors: list[torch.Tensor]
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    base_index: Optional[int] = None
    generator: Optional[torch.Generator] = None
    # Layer position in [0, 1] as used for gradients; methods rarely need it.
    t: float = 0.0
    # True when the caller (the engine) owns ``tensors`` and drops them after the call:
    # the method may then overwrite them (e.g. form task vectors in place) to save memory.
    # Otherwise inputs must be left untouched.
    disposable: bool = False
    # True for the token embeddings and the LM head (tied or not): tensors indexed by the
    # vocabulary, which subspace methods leave out of their decomposition by default.
    vocab: bool = False
    # Calibration statistics of each input, in the order of ``tensors``, for methods whose spec
    # lists ``needs_stats``: ``stats[i]["gram"]`` (the [in, in] Gram matrix of this linear weight's
    # input), ``stats[i]["fisher"]`` (shaped like the tensor), ``stats[i]["fisher_norm"]`` (0-d: the
    # L2 norm of that model's whole Fisher). An input's dict lacks a kind the calibration did not
    # produce for that tensor (a norm has no Gram). Statistics given in a file (a ``Param`` with
    # ``stats_file``) appear under the parameter's name, e.g. ``stats[i]["coefficients"]`` for ``dam``.
    # None for methods that need no statistics.
    stats: Optional[list[dict[str, torch.Tensor]]] = None

    @property
    def base(self) -> torch.Tensor:
        if self.base_index is None:
            raise ValueError(f"{self.name}: this method needs a base model")
        return self.tensors[self.base_index]

    def others(self) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """The non-base inputs and their per-model parameters, in recipe order."""
        keep = [i for i in range(len(self.tensors)) if i != self.base_index]
        return [self.tensors[i] for i in keep], [self.model_params[i] for i in keep]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[TensorGroup], torch.Tensor]
    params: tuple[Param, ...] = ()
    base: BasePolicy = BasePolicy.IGNORED
    min_models: int = 1  # counted without the base model
    max_models: Optional[int] = None  # counted without the base model
    stochastic: bool = False
    reference: str = ""  # paper or source the method follows
    summary: str = ""
    # Checks that span several parameters of one tensor (e.g. della's density and
    # epsilon); returns error messages. Called at plan time, before any weight is read.
    check_params: Optional[Callable[[dict[str, Any], list[dict[str, Any]]], list[str]]] = None
    # Passthrough-style methods take exactly one input per output tensor and may
    # change the layer count (slices stacking).
    passthrough: bool = False
    # Calibration statistics the method reads from ``TensorGroup.stats`` ("gram", "fisher"); the
    # merge computes (or finds cached) whatever is missing before streaming.
    needs_stats: tuple[str, ...] = ()
    # Extra working memory beyond the engine's default allowance (2 x inputs + 2 tensors), in
    # tensors of the output's size per input, for --dry-run's predicted peak. Measured, not guessed:
    # see the method's registration.
    workspace_per_input: float = 0.0
    # Whether the result for one tensor is row-separable: each output row depends only on the same
    # row of every input (entry-wise math, as a weighted sum), so the engine may merge a large tensor
    # a block of rows at a time and never hold its inputs whole. Called at plan time with the
    # tensor's resolved global parameters, whether it is a vocabulary tensor and its number of
    # dimensions. None: never. A method that ranks, samples, normalizes or decomposes over the
    # whole tensor must not claim it; the chunked result must equal the whole one bit for bit.
    row_separable: Optional[Callable[[dict[str, Any], bool, int], bool]] = None

    def param(self, name: str) -> Optional[Param]:
        for p in self.params:
            if p.name == name:
                return p
        return None


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"merge method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


def all_methods() -> dict[str, MethodSpec]:
    return dict(sorted(_REGISTRY.items()))


# Parameters shared by many methods, declared once.
def weight_param(on_base: bool = False, default: Any = REQUIRED) -> Param:
    return Param("weight", float, default, per_model=True, on_base=on_base,
                 doc="the model's weight in the merge")


def density_param(default: float = 1.0) -> Param:
    return Param("density", float, default, per_model=True, low=0.0, high=1.0, low_open=True,
                 doc="fraction of the task vector's entries kept")


def include_embeddings_param() -> Param:
    """The subspace methods' switch for the vocabulary tensors (token embeddings, lm_head)."""
    return Param("include_embeddings", bool, False,
                 doc="decompose the token embeddings and lm_head too (otherwise they get the "
                     "method's fallback)")


def decomposes(params: dict[str, Any], vocab: bool, ndim: int) -> bool:
    """Subspace methods decompose 2-D tensors; vocabulary tensors only with ``include_embeddings``."""
    return ndim == 2 and (not vocab or params["include_embeddings"])


def is_decomposed(group: TensorGroup) -> bool:
    return decomposes(group.params, group.vocab, group.base.dim())


def every_tensor(params: dict[str, Any], vocab: bool, ndim: int) -> bool:
    """``row_separable`` of an entry-wise method: every tensor."""
    return True


def not_decomposed(params: dict[str, Any], vocab: bool, ndim: int) -> bool:
    """``row_separable`` of a subspace method: the tensors its entry-wise fallback merges."""
    return not decomposes(params, vocab, ndim)
