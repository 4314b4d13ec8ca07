"""data.balance_ranks: each optimizer step's samples split over the ranks by estimated compute
(every sample once, the same count per rank, the busiest rank close to the mean)."""

import numpy as np
import pytest

from conftest import compose_config
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.data.sampler import StepSampler, balanced_share
from vlmtrain.models.build import load_tokenizer


def _imbalance(chunk_shares, costs) -> float:
    loads = [costs[s].sum() for s in chunk_shares]
    return max(loads) / np.mean(loads)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_balanced_share_covers_the_step_and_evens_the_load(world):
    rng = np.random.default_rng(0)
    costs = rng.lognormal(7, 0.8, size=4096)  # long-tailed, like tiles x tokens
    per_step = 24 * world
    balanced, round_robin = [], []
    for _ in range(30):
        chunk = rng.permutation(len(costs))[:per_step]
        shares = [balanced_share(chunk, costs, r, world) for r in range(world)]
        assert sorted(np.concatenate(shares).tolist()) == sorted(chunk.tolist())  # every sample once
        assert {len(s) for s in shares} == {per_step // world}
        assert all(np.array_equal(s, balanced_share(chunk, costs, r, world)) for r, s in enumerate(shares))
        balanced.append(_imbalance(shares, costs))
        round_robin.append(_imbalance([chunk[r::world] for r in range(world)], costs))
    assert np.mean(balanced) < 1.03 < np.mean(round_robin)


def test_sampler_with_costs_keeps_each_step_and_resumes():
    costs = np.random.default_rng(1).uniform(1, 100, size=40)
    steps = {}
    for rank in range(2):
        s = StepSampler(40, 8, rank=rank, world_size=2, seed=3, costs=costs)
        steps[rank] = [[i for i, _ in b] for b in s]
    plain = [[i for i, _ in b] for b in StepSampler(40, 8, seed=3)]
    for k, whole in enumerate(plain):
        assert sorted(steps[0][k] + steps[1][k]) == sorted(whole)
    resumed = StepSampler(40, 8, rank=1, world_size=2, seed=3, costs=costs)
    resumed.load_state_dict({"epoch": 0, "start_step": 2})
    assert [[i for i, _ in b] for b in resumed] == steps[1][2:]
    with pytest.raises(ValueError, match="costs for 39 samples"):
        StepSampler(40, 8, costs=costs[:39])


def test_cost_is_tokens_plus_weighted_tiles_of_the_built_sample():
    cfg = compose_config([])
    tok = load_tokenizer(cfg.model)
    ds = MixtureDataset(cfg.data, tok, tokens_per_tile=64, seed=0)
    for i in range(12):
        sample = ds.load(i, 0)
        assert ds.cost(i, tile_cost=100.0) == len(sample.input_ids) + 100.0 * sum(sample.num_tiles)


@pytest.mark.slow
def test_scaleout_data_is_balanced_across_two_ranks():
    """The scale-out experiment's data (demo at 448 px, n_max 12, 64 samples per step) with the 1B
    architecture's tile cost: round robin leaves the busier of 2 ranks ~7% above the mean
    (measured on GPU: experiments/results/scaleout.md), the cost split well under 1%."""
    from vlmtrain.models.internvl import build_from_config
    from vlmtrain.training.flops import InternVLDims, tile_cost_in_tokens

    cfg = compose_config(["experiment=scaleout_internvl2_5_1b"])
    tok = load_tokenizer(cfg.model)
    model = build_from_config(cfg.model, tok.convert_tokens_to_ids("<IMG_CONTEXT>"), device="meta")
    tile_cost = tile_cost_in_tokens(InternVLDims.from_hf_config(model.config))
    ds = MixtureDataset(cfg.data, tok, tokens_per_tile=256, seed=cfg.seed)
    costs = np.array([ds.cost(i, tile_cost) for i in range(len(ds))])
    order = StepSampler(len(ds), 64, seed=cfg.seed).order(0)
    chunks = [order[k * 64:(k + 1) * 64] for k in range(len(ds) // 64)]
    balanced = np.mean([_imbalance([balanced_share(c, costs, r, 2) for r in range(2)], costs) for c in chunks])
    round_robin = np.mean([_imbalance([c[r::2] for r in range(2)], costs) for c in chunks])
    print(f"busiest rank / mean: round robin {round_robin:.4f}, balanced {balanced:.4f}")
    assert balanced < 1.01 and round_robin > 1.03
