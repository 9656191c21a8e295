"""Checkpoints: roundtrip, atomic writes, run identity, corrupt files and weights_only loading."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import metalearn.checkpoint as ckpt
from metalearn.checkpoint import (
    CheckpointLoadError,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from metalearn.errors import CheckpointMismatchError
from metalearn.knowledge import MetaKnowledge, maml, meta_sgd
from metalearn.models import MLP

CONFIG = {"dataset": "sinusoid", "shots": 5, "nested": {"hidden": [8, 8]}}


def _trained(seed: int = 0, hidden: int = 8, lr: float = 0.01) -> tuple[MetaKnowledge, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    omega = meta_sgd(MLP((1, hidden, hidden, 1)), lr=lr)
    opt = torch.optim.Adam(omega.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum((p**2).sum() for p in omega.parameters()).backward()
        opt.step()
    return omega, opt


def _fresh(seed: int = 1, hidden: int = 8, lr: float = 0.01) -> tuple[MetaKnowledge, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    omega = meta_sgd(MLP((1, hidden, hidden, 1)), lr=lr)
    return omega, torch.optim.Adam(omega.parameters(), lr=1e-2)


def _assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][name])


def test_roundtrip_restores_omega_optimizer_step_and_extra(tmp_path):
    omega, opt = _trained()
    path = save_checkpoint(
        tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=7, config=CONFIG, extra={"note": "hi", "x": 1.5}
    )
    other, other_opt = _fresh()
    info = load_checkpoint(path, omega=other, outer_optimizer=other_opt, config=CONFIG)
    assert info.step == 7 and info.extra == {"note": "hi", "x": 1.5} and len(info.fingerprint) == 64
    for (n, p), (_, q) in zip(omega.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    _assert_same_state(opt, other_opt)


def test_rng_state_roundtrip_covers_torch_python_and_numpy(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    omega, opt = _fresh()
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    info = load_checkpoint(path, omega=omega, outer_optimizer=opt)
    restore_rng_state(info.rng_state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_load_with_config_none_loads_omega_for_meta_testing(tmp_path):
    omega, opt = _trained()
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=1, config=CONFIG)
    other, _ = _fresh(lr=0.3)  # a setting may differ when only the weights are loaded ...
    load_checkpoint(path, omega=other)
    assert all(torch.equal(p, q) for p, q in zip(omega.parameters(), other.parameters(), strict=True))
    wider, _ = _fresh(hidden=9)  # ... the weights' shapes may not
    with pytest.raises(CheckpointMismatchError, match="omega.parameters"):
        load_checkpoint(path, omega=wider)


def test_crash_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    omega, opt = _trained()
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=1)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, omega=omega, outer_optimizer=opt, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"config": {**CONFIG, "shots": 10}}, "config.shots"),
        ({"config": {**CONFIG, "nested": {"hidden": [8, 9]}}}, "config.nested.hidden"),
        ({"hidden": 9}, "omega.parameters.model.layers.0.weight"),
        ({"lr": 0.5}, "omega.modules.optimizer"),
        ({"opt": "sgd"}, "outer_optimizer.class"),
    ],
)
def test_another_configuration_is_refused_and_nothing_is_loaded(tmp_path, change, named):
    omega, opt = _trained()
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=3, config=CONFIG)
    written = path.read_bytes()
    other, other_opt = _fresh(hidden=change.get("hidden", 8))
    if "lr" in change:
        other, other_opt = _fresh(lr=change["lr"])
    if "opt" in change:
        other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(CheckpointMismatchError, match="another configuration") as info:
        load_checkpoint(path, omega=other, outer_optimizer=other_opt, config=change.get("config", CONFIG))
    message = str(info.value)
    assert named in message and "fresh checkpoint directory" in message
    assert all(torch.equal(p, b) for p, b in zip(other.parameters(), before, strict=True))
    assert path.read_bytes() == written


def test_a_torch_version_adding_an_optimizer_default_is_not_a_mismatch():
    stored = {"outer_optimizer": {"defaults": {"lr": 0.1}}}
    current = {"outer_optimizer": {"defaults": {"lr": 0.1, "new_flag": False}}}
    assert ckpt._differences(stored, current) == []
    assert ckpt._differences(stored, {"outer_optimizer": {"defaults": {"lr": 0.2}}})


def test_a_learning_rate_schedule_does_not_change_the_identity(tmp_path):
    omega, opt = _trained()
    opt.param_groups[0]["lr"] = 1e-5  # what a scheduler does
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=1)
    other, other_opt = _fresh()
    load_checkpoint(path, omega=other, outer_optimizer=other_opt)
    assert other_opt.param_groups[0]["lr"] == 1e-5


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_raises_a_clear_error(tmp_path, damage):
    omega, opt = _trained()
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=1)
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 10, "empty": b""}[damage]
    )
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt"):
        load_checkpoint(path, omega=omega, outer_optimizer=opt)


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this object runs code (it writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_loading_never_unpickles_code(tmp_path):
    omega, opt = _trained()
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "version": 1, "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointLoadError, match="weights_only"):
        load_checkpoint(path, omega=omega, outer_optimizer=opt)
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(Payload(marker), f, protocol=2)
    with pytest.raises(CheckpointLoadError):
        load_checkpoint(tmp_path / "plain.pkl", omega=omega)
    assert not marker.exists()


def test_a_torch_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    omega, _ = _fresh()
    torch.save(omega.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointLoadError, match="not a metalearn checkpoint"):
        load_checkpoint(tmp_path / "weights.pt", omega=omega)


def test_unsafe_extra_or_non_json_config_is_refused_before_writing(tmp_path):
    omega, opt = _fresh()
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "a.pt", omega=omega, outer_optimizer=opt, step=0, extra={"obj": object()})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "b.pt", omega=omega, outer_optimizer=opt, step=0, config={"root": tmp_path})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_names_and_latest(tmp_path):
    omega, opt = _fresh()
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 1):
        save_checkpoint(checkpoint_path(tmp_path, step), omega=omega, outer_optimizer=opt, step=step)
    (tmp_path / ".step-00000099.pt.abc.tmp").write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 10]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010.pt"


def test_state_rng_capture_is_weights_only_safe(tmp_path):
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    restore_rng_state(loaded)
    assert torch.equal(loaded["torch"], state["torch"])


def test_maml_checkpoint_without_optimizer(tmp_path):
    torch.manual_seed(0)
    omega = maml(MLP((1, 4, 1)), lr=0.1)
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=None, step=0)
    opt = torch.optim.Adam(omega.parameters())
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(path, omega=omega, outer_optimizer=opt)
    load_checkpoint(path, omega=omega)


def test_a_tampered_optimizer_state_is_refused_for_a_fresh_optimizer_too(tmp_path):
    omega, opt = _trained()
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=1)
    payload = torch.load(path, weights_only=True)
    payload["outer_optimizer"]["state"][1]["exp_avg_sq"] = torch.zeros(5)
    torch.save(payload, path)
    other, other_opt = _fresh()  # no optimizer state yet: the state is checked against the parameters' shapes
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(CheckpointLoadError, match=r"optimizer state 1.*exp_avg_sq: checkpoint has shape \[5\]"):
        load_checkpoint(path, omega=other, outer_optimizer=other_opt)
    assert all(torch.equal(p, b) for p, b in zip(other.parameters(), before, strict=True))
    assert other_opt.state_dict()["state"] == {}


def test_loading_weights_only_is_all_or_nothing_too(tmp_path):
    omega, opt = _trained()
    path = save_checkpoint(tmp_path / "c.pt", omega=omega, outer_optimizer=opt, step=1)
    payload = torch.load(path, weights_only=True)
    last = list(payload["omega"])[-1]
    payload["omega"][last] = payload["omega"][last][:0]
    torch.save(payload, path)
    other, _ = _fresh()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointLoadError, match="Nothing was loaded"):
        load_checkpoint(path, omega=other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_checkpoints_are_written_with_the_default_mode(tmp_path):
    import os
    import stat

    omega, opt = _fresh()
    old = os.umask(0o077)
    try:
        private = save_checkpoint(tmp_path / "a.pt", omega=omega, outer_optimizer=opt, step=0)
        os.umask(0o002)
        shared = save_checkpoint(tmp_path / "b.pt", omega=omega, outer_optimizer=opt, step=0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(shared.stat().st_mode) == 0o664


def test_a_full_disk_is_named_and_there_may_be_no_earlier_checkpoint(tmp_path, monkeypatch):
    import errno

    omega, opt = _fresh()

    def full(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OSError, match="no space left on the device.*there is no earlier checkpoint") as info:
        save_checkpoint(checkpoint_path(tmp_path, 1), omega=omega, outer_optimizer=opt, step=1)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_torchs_advice_to_load_unsafely_is_never_passed_on(tmp_path):
    omega, _ = _fresh()
    path = tmp_path / "p4.pt"
    with open(path, "wb") as f:  # protocol 4: torch says "Unsupported operand 149", next to its advice
        pickle.dump({"a": 1}, f, protocol=4)
    with pytest.raises(CheckpointLoadError, match="holds pickled Python objects") as info:
        load_checkpoint(path, omega=omega)
    assert "weights_only` set to `False`" not in str(info.value) and "weights_only=False" not in str(info.value)
    path.write_bytes(b"\x00" * 64)  # garbage also gets "Unsupported operand": it is corrupt, not a pickle
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt") as info:
        load_checkpoint(path, omega=omega)
    assert "False" not in str(info.value)
