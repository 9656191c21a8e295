"""``metalearn`` re-exports the public API: every name in ``__all__`` exists, and the public
classes of the subpackages the docs teach are all there."""

from __future__ import annotations

import inspect

import pytest

import metalearn
import metalearn.knowledge
import metalearn.models
import metalearn.tasks


def test_every_name_in_all_exists():
    missing = [n for n in metalearn.__all__ if not hasattr(metalearn, n)]
    assert not missing
    assert len(set(metalearn.__all__)) == len(metalearn.__all__)


# metalearn.tasks is left out: its task families, transforms and download errors (Harmonics,
# Linear, Rotate90, DownloadError, ...) are reached as metalearn.tasks.X, as the docs write them
@pytest.mark.parametrize("package", [metalearn.knowledge, metalearn.models])
def test_public_classes_of_subpackages_are_exported(package):
    classes = [
        n for n in package.__all__
        if inspect.isclass(getattr(package, n)) and not n.isupper()
    ]
    # kept in their subpackage on purpose: building blocks of the search space and result types
    internal = {"Cell", "Zero", "MixedOp", "ContractError", "ContractReport", "Choice", "State"}
    missing = [n for n in classes if n not in internal and n not in metalearn.__all__]
    assert not missing, f"{package.__name__} classes not re-exported by metalearn: {missing}"


def test_names_the_issue_lists_are_exported():
    for name in ("InnerAdam", "MomentumSGD", "OptimizerMixture", "GaussianInit", "ScaledInit", "SearchableConvNet",
                 "ArchitectureWeights", "check_part", "param_key"):
        home = metalearn.models if name == "SearchableConvNet" else metalearn.knowledge
        assert name in metalearn.__all__ and getattr(metalearn, name) is getattr(home, name)


OLD_NAMES = [
    (metalearn, "SGD", "InnerSGD"),
    (metalearn, "Adam", "InnerAdam"),
    (metalearn, "TensorDataset", "TensorLabelledDataset"),
    (metalearn.knowledge, "SGD", "InnerSGD"),
    (metalearn.knowledge, "Adam", "InnerAdam"),
    (metalearn.tasks, "TensorDataset", "TensorLabelledDataset"),
]


@pytest.mark.parametrize(("package", "old", "new"), OLD_NAMES, ids=lambda v: getattr(v, "__name__", v))
def test_old_names_that_shadowed_torch_warn_and_give_the_new_class(package, old, new):
    # SGD, Adam and TensorDataset shadowed torch.optim's and torch.utils.data's: renamed, old names kept one release
    message = rf"{package.__name__}\.{old} is deprecated.*use {package.__name__}\.{new}"
    with pytest.warns(DeprecationWarning, match=message):
        got = getattr(package, old)
    assert got is getattr(package, new)
    assert old not in package.__all__ and new in package.__all__  # `import *` brings only the new name


def test_old_names_import_with_a_warning_and_unknown_names_still_fail():
    with pytest.warns(DeprecationWarning, match="InnerSGD"):
        from metalearn import SGD  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        metalearn.NoSuchThing  # noqa: B018
    with pytest.raises(ImportError):
        from metalearn.knowledge import TensorDataset  # noqa: F401  (a tasks name, not a knowledge one)


def test_renamed_classes_do_not_clash_with_torch():
    import torch.optim
    import torch.utils.data

    for name in metalearn.__all__:
        assert not hasattr(torch.optim, name) and not hasattr(torch.utils.data, name), name
