"""Multi-source, variable-way variable-shot episodes (Meta-Dataset's sampling rules)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import metalearn
from metalearn import Conv4, evaluate, maml, meta_train
from metalearn.tasks import EpisodeSource, MetaDatasetSampling, MultiSourceEpisodes, TensorLabelledDataset
from metalearn.tasks.multi_source import episode_shots


def _dataset(counts: list[int], offset: float, size: int = 4) -> TensorLabelledDataset:
    """Class ``c`` has ``counts[c]`` items; item ``i``'s pixels all equal ``offset + i`` (unique ids)."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    ids = offset + torch.arange(labels.numel(), dtype=torch.float64)
    return TensorLabelledDataset(ids[:, None, None, None].expand(-1, 1, size, size).clone(), labels)


@pytest.fixture
def sources():
    big = _dataset([40 + (c * 7) % 60 for c in range(70)], offset=0.0)  # 70 classes, 40..99 items each
    small = _dataset([3, 5, 8, 2, 13, 21, 4], offset=1e6)  # 7 classes, as few as 2 items
    return [EpisodeSource(big, weight=3.0, name="big"), EpisodeSource(small, weight=1.0, name="small")]


def _ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].long().tolist()


def test_tasks_are_a_pure_function_of_seed_and_index(sources):
    a = MultiSourceEpisodes(sources, seed=3, length=20)
    b = MultiSourceEpisodes(sources, seed=3, length=20)
    for i in (0, 7, 19):
        assert torch.equal(a[i].train[0], b[i].train[0]) and torch.equal(a[i].val[1], b[i].val[1])
    assert torch.equal(a[5].train[0], a[5].train[0])  # indexing again, after other tasks, gives the same task
    other = MultiSourceEpisodes(sources, seed=4, length=20)
    assert any(a[i].train[0].shape != other[i].train[0].shape for i in range(20))


def test_every_episode_follows_the_sampling_rules(sources):
    tasks = MultiSourceEpisodes(sources, seed=0, length=200)
    counts = {s.name: torch.bincount(s.dataset.labels) for s in sources}
    ways_seen = {"big": set(), "small": set()}
    imbalanced = 0
    for i in range(len(tasks)):
        task, name = tasks[i], tasks.source_of(i)
        (x_tr, y_tr), (x_val, y_val) = task.train, task.val
        ids_tr, ids_val = _ids(x_tr), _ids(x_val)
        assert (x_tr[:, 0, 0, 0] >= 1e6).all() == (name == "small")  # the inputs come from the named source
        ways = int(y_val.max()) + 1
        ways_seen[name].add(ways)
        n_classes = counts[name].numel()
        assert 5 <= ways <= min(50, n_classes)
        assert len(set(ids_tr + ids_val)) == len(ids_tr) + len(ids_val)  # no example twice
        shots = torch.bincount(y_tr, minlength=ways)
        queries = torch.bincount(y_val, minlength=ways)
        assert torch.equal(y_tr, torch.arange(ways).repeat_interleave(shots))  # grouped by class
        # each episode label is one dataset class: read it back from the examples' ids
        labels = sources[0 if name == "big" else 1].dataset.labels
        offset = 0 if name == "big" else 1e6
        cls = [{int(labels[int(j - offset)]) for j, y in zip(ids_tr + ids_val, y_tr.tolist() + y_val.tolist(),
                                                             strict=True) if y == k} for k in range(ways)]
        assert all(len(c) == 1 for c in cls) and len(set().union(*cls)) == ways
        n_c = counts[name][[next(iter(c)) for c in cls]]
        q = min(10, int((n_c // 2).min()))
        assert (queries == q).all()  # balanced query set of the paper's size
        assert (shots >= 1).all() and (shots <= n_c - q).all() and shots.sum() <= 500
        imbalanced += int(shots.unique().numel() > 1)
    assert ways_seen["small"] == {5, 6, 7}  # the whole range [5, min(50, 7)]
    assert min(ways_seen["big"]) <= 8 and max(ways_seen["big"]) >= 45
    assert imbalanced > len(tasks) // 2  # shots differ between the classes of most episodes


def test_sources_are_drawn_by_weight(sources):
    tasks = MultiSourceEpisodes(sources, seed=1, length=2000)
    big = sum(tasks.source_of(i) == "big" for i in range(len(tasks)))
    assert abs(big / len(tasks) - 0.75) < 0.04  # 3:1; the binomial s.d. is ~0.01


def test_shots_match_the_papers_formulas():
    counts = torch.tensor([12, 40, 7, 100, 600, 33])
    cfg = MetaDatasetSampling()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        got = episode_shots(counts, cfg, g)
        # the same draws, in the same order, then the formulas of Meta-Dataset's sampling.py in numpy
        r = torch.Generator().manual_seed(seed)
        beta = float(torch.rand((), generator=r, dtype=torch.float64))
        u = torch.rand(6, generator=r, dtype=torch.float64).numpy()
        alpha = math.log(0.5) + (math.log(2) - math.log(0.5)) * u
        n = counts.numpy()
        q = min(10, (n // 2).min())
        remaining = n - q
        size = min(np.floor(beta * np.minimum(100, remaining) + 1).sum(), 500)
        share = n * np.exp(alpha)
        want = np.minimum(np.floor(share / share.sum() * (size - len(n))).astype(int) + 1, remaining)
        assert got.tolist() == want.tolist()


def test_constants_can_be_changed():
    data = _dataset([30] * 12, offset=0.0)
    cfg = MetaDatasetSampling(min_ways=2, max_ways=3, max_query=4)
    tasks = MultiSourceEpisodes([EpisodeSource(data)], sampling=cfg, seed=0, length=40)
    for task in tasks:
        ways = int(task.val[1].max()) + 1
        assert 2 <= ways <= 3 and task.val[1].numel() == 4 * ways
    assert tasks.max_ways == 3 and not tasks.fixed_shape


def test_describe_changes_with_the_sources(sources):
    a = MultiSourceEpisodes(sources, seed=0).describe()
    b = MultiSourceEpisodes([sources[0], EpisodeSource(sources[1].dataset, weight=2.0, name="small")]).describe()
    assert a != b and a == MultiSourceEpisodes(sources, seed=0).describe()


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda s: MultiSourceEpisodes([]), ValueError, "sources is empty"),
        (lambda s: MultiSourceEpisodes([EpisodeSource(s[0].dataset, weight=0.0)]), ValueError, "positive and finite"),
        (lambda s: MultiSourceEpisodes([s[0].dataset]), TypeError, "EpisodeSource"),
        (lambda s: MultiSourceEpisodes([EpisodeSource(_dataset([5, 5, 1, 5, 5, 5], 0.0))]), ValueError,
         r"\[2\] have fewer than 2"),
        (lambda s: MultiSourceEpisodes([EpisodeSource(s[1].dataset, classes=[0, 1, 2])]), ValueError, "min_ways=5"),
        (lambda s: MultiSourceEpisodes([s[0], EpisodeSource(_dataset([9] * 8, 0.0, size=5))]), ValueError,
         "different shapes"),
        (lambda s: MetaDatasetSampling(min_ways=6, max_ways=5), ValueError, "min_ways"),
        (lambda s: MetaDatasetSampling(max_query=0), ValueError, "max_query"),
    ],
)
def test_bad_arguments_name_the_fix(sources, make, error, match):
    with pytest.raises(error, match=match):
        make(sources)


def test_a_transform_brings_sources_to_one_shape(sources):
    odd = _dataset([9] * 8, 1e7, size=5)
    with pytest.raises(ValueError, match="transform="):
        MultiSourceEpisodes([sources[0], EpisodeSource(odd)])
    crop = EpisodeSource(odd, name="odd", transform=lambda x: x[..., :4, :4] * 2)
    tasks = MultiSourceEpisodes([sources[0], crop], seed=0, length=30)
    i = next(i for i in range(30) if tasks.source_of(i) == "odd")
    x = tasks[i].train[0]
    assert x.shape[1:] == (1, 4, 4) and (x >= 2e7).all()  # transformed inputs of the odd source


def test_batches_of_several_episodes_are_refused(sources):
    tasks = MultiSourceEpisodes(sources, seed=0, length=10)
    assert len(tasks.batch([3])) == 1
    with pytest.raises(ValueError, match="meta_batch_size=1"):
        tasks.batch([0, 1])


def test_exported():
    assert metalearn.MultiSourceEpisodes is MultiSourceEpisodes and metalearn.EpisodeSource is EpisodeSource


def test_meta_train_and_evaluate_on_variable_episodes(tmp_path):
    """The loop path takes episodes of every size: a few MAML steps, one episode per step."""
    torch.manual_seed(0)
    images = [torch.rand(n * 6, 1, 16, 16) for n in (9, 7)]
    datasets = [TensorLabelledDataset(x, torch.arange(x.shape[0] // 6).repeat_interleave(6)) for x in images]
    sampling = MetaDatasetSampling(min_ways=5, max_ways=9, max_query=2)
    tasks = MultiSourceEpisodes(
        [EpisodeSource(d, weight=w, name=str(i)) for i, (d, w) in enumerate(zip(datasets, (1.0, 2.0), strict=True))],
        sampling=sampling,
        seed=0,
        length=None,
    )
    omega = maml(Conv4(num_classes=tasks.max_ways, in_channels=1, hidden=4, image_size=16), lr=0.1)
    before = {n: p.detach().clone() for n, p in omega.named_parameters()}
    shapes = {tuple(tasks[i].train[0].shape) for i in range(4)}
    assert len(shapes) > 1  # the steps below really see episodes of different sizes
    outer = torch.optim.Adam(omega.parameters(), lr=1e-3)
    result = meta_train(omega, tasks, outer, steps=4, inner_steps=1, meta_batch_size=1, progress=False,
                        batching="loop", checkpoint_dir=tmp_path / "run")
    assert result.steps == 4 and all(math.isfinite(r["meta_loss"]) for r in result.history)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in omega.named_parameters())
    held_out = MultiSourceEpisodes([EpisodeSource(d) for d in datasets], sampling=sampling, seed=9, length=3)
    scores = evaluate(omega, list(held_out), inner_steps=1)
    assert 0.0 <= scores.mean <= 1.0
