"""ShardedEMA without partitioning (one process, no DeepSpeed): it must be the plain EMA, with the same state-dict
layout; the partitioned cases are compared with one process in tests/test_engines.py (ZeRO-1/2/3, 2 ranks)."""

import pytest
import torch

from erw_fast.ema import EMA
from erw_fast.engines.sharded_ema import ShardedEMA


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)  # a frozen parameter: its EMA is its value
    model.register_buffer("scale", torch.tensor(2.0))
    return model


def test_unpartitioned_sharded_ema_is_the_plain_ema():
    model = _model()
    sharded, plain = ShardedEMA(model, 0.9), EMA(model, 0.9)
    assert not sharded.partitioned and sharded.local_numel == sum(p.numel() for p in model.parameters()
                                                                  if p.requires_grad)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        sharded.update()
        plain.update()
    ours, reference = sharded.state_dict(), plain.state_dict()
    assert list(ours) != [] and set(ours) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-7, msg=key)


def test_loading_checks_names_and_shapes():
    model = _model()
    ema = ShardedEMA(model, 0.5)
    state = {k: v + 1 for k, v in ema.state_dict().items()}
    ema.load_state_dict(state)
    torch.testing.assert_close(ema.state_dict()["0.weight"], state["0.weight"])
    with pytest.raises(KeyError, match="lacks 1 trained parameter"):
        ema.load_state_dict({k: v for k, v in state.items() if k != "2.bias"})
    with pytest.raises(ValueError, match=r"EMA 0.weight: shape \(3, 4\) != parameter \(4, 3\)"):
        ema.load_state_dict({**state, "0.weight": torch.zeros(3, 4)})


def test_rank_owners_balance_the_elements():
    from erw_fast.engines.rank_sharded_ema import assign_owners

    sizes = {"a": 100, "b": 60, "c": 50, "d": 40, "e": 10, "f": 10}
    owners = assign_owners(sizes, 2)
    load = [sum(n for k, n in sizes.items() if owners[k] == r) for r in range(2)]
    assert set(owners) == set(sizes) and sorted(load) == [130, 140]  # largest first: 100+40 vs 60+50+10+10
    assert assign_owners(sizes, 1) == dict.fromkeys(sizes, 0)
    assert len(set(assign_owners(sizes, 8).values())) == 6  # more ranks than tensors: some own nothing


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group: RankShardedEMA gathers through collectives."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["EMA", "RankShardedEMA", "ShardedEMA"])
def test_every_ema_has_one_interface(kind, one_rank_group):
    from erw_fast.ema import WeightEMA
    from erw_fast.engines.rank_sharded_ema import RankShardedEMA

    model = _model()
    make = {"EMA": lambda: EMA(model, 0.9), "RankShardedEMA": lambda: RankShardedEMA(model, 0.9, 0, 1),
            "ShardedEMA": lambda: ShardedEMA(model, 0.9)}[kind]
    ema, plain = make(), EMA(model, 0.9)
    assert isinstance(ema, WeightEMA) and ema.local_numel > 0
    start = {k: v.clone() for k, v in ema.state_dict().items()}  # EMA's are its model's own tensors
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ema.update(applied=torch.tensor(False))  # a skipped step leaves the average as it was
    for key, value in ema.state_dict(everywhere=False).items():
        torch.testing.assert_close(value, start[key], rtol=0, atol=0, msg=key)
    ema.update(applied=torch.tensor(True))
    plain.update()
    ours = ema.state_dict()
    assert set(ours) == set(plain.state_dict())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-7, msg=key)
    ema.load_state_dict(start)
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, start[key], rtol=0, atol=0, msg=key)


def test_a_device_side_skip_flag_is_never_read_on_the_host():
    """update(applied=flag) weighs the lerp by a 0-dim tensor without converting it to a Python number (which
    would wait for the GPU every step): no aten._local_scalar_dense in the update, and the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from erw_fast.ema import EMA

    class Calls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    flagged, plain = EMA(model, 0.9), EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    calls = Calls()
    with calls:
        flagged.update(applied=torch.tensor(True))
    assert not any("_local_scalar_dense" in name for name in calls.names), calls.names
    plain.update()
    for a, b in zip(flagged.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    flagged.update(applied=torch.tensor(False))  # a skipped step leaves it untouched
    for a, b in zip(flagged.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
