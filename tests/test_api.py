"""The public surface: what each module's ``__all__`` promises, and signatures shaped like torch's."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import pytest
import torch
from torch.optim.optimizer import ParamsT

import lars_plugins
from lars_plugins import LAMB, LARS, Layerwise

# Modules whose import needs an optional extra: (module, the package it needs).
NEEDS = {"lars_plugins.timm": "timm", "lars_plugins.ranger": "timm", "lars_plugins.hf": "transformers",
         "lars_plugins.lightning": "lightning",
         "lars_plugins.pytorch_lightning": "pytorch_lightning", "lars_plugins.plot": "matplotlib"}
MODULES = ["lars_plugins", *(m.name for m in pkgutil.walk_packages(lars_plugins.__path__, "lars_plugins."))]


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_existing_public_documented_names(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"
    if name.rsplit(".", 1)[-1].startswith("_"):
        return  # a private module: its names are not promised to anyone
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    for public in exported:
        assert hasattr(module, public), f"{name}.__all__ lists {public!r}, which it does not define"
        assert not public.startswith("_") or public == "__version__", f"{name}.__all__ lists private {public!r}"
        value = getattr(module, public)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name}.{public} has no docstring"
        if inspect.isfunction(value):
            hints = typing.get_type_hints(value)
            assert "return" in hints, f"{name}.{public} has no return annotation"


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_options_are_keyword_only_after_torch_s_positional_ones(cls):
    """As torch.optim.SGD/Adam: ``maximize`` and ``foreach`` (and our own options) keyword-only, so a
    positional call written for timm's Lars (``trust_coeff`` 7th) fails instead of misassigning."""
    torch_cls = torch.optim.SGD if cls is LARS else torch.optim.Adam
    ours, theirs = inspect.signature(cls).parameters, inspect.signature(torch_cls).parameters
    for name in ("maximize", "foreach"):
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert theirs[name].kind is inspect.Parameter.KEYWORD_ONLY  # the convention followed
    positional = [n for n, p in ours.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == [n for n in theirs if n in positional]  # a prefix of torch's, in its order
    assert typing.get_type_hints(cls.__init__)["params"] == ParamsT  # torch's own alias
    with pytest.raises(TypeError):
        LARS([torch.nn.Parameter(torch.ones(2, 2))], 0.1, 0.9, 0.0, 1e-4, False, 0.001)


def test_the_wrapper_takes_its_options_by_keyword():
    base = torch.optim.SGD([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY
               for n, p in inspect.signature(Layerwise).parameters.items() if n != "base")
    with pytest.raises(TypeError):
        Layerwise(base, 0.01)
