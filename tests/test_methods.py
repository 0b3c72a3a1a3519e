import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import EvomergeError
from evomerge.methods import METHODS, blockwise, merge_tensors, sparsify
from evomerge.methods.sparsify import (
    della_mask,
    magnitude_mask,
    outlier_mask,
    random_mask,
    rescale_factor,
    uniform,
)

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


# -- every method is there, documented, with a schema ------------------------------------------

EXPECTED = {
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "multislerp", "model_stock", "karcher", "sce", "passthrough",
}  # fmt: skip


def test_every_mergekit_method_is_registered_with_a_doc_and_schema():
    assert set(METHODS) == EXPECTED
    for m in METHODS.values():
        assert m.doc and m.params, m.name
        assert all(p.doc for p in m.params), m.name


# -- linear and task arithmetic ----------------------------------------------------------------


def test_linear_with_one_model_at_weight_one_is_the_identity():
    x = torch.randn(3, 4)
    assert torch.equal(merge_tensors("linear", [x], weight=[1.0]), x)


def test_linear_normalizes_by_the_sum_of_weights_unless_told_not_to():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    assert close(merge_tensors("linear", [a, b], weight=[1, 3]), [(1 + 9) / 4, (2 + 18) / 4])
    assert close(merge_tensors("linear", [a, b], weight=[1, 3], normalize=False), [10, 20])


def test_task_arithmetic_adds_weighted_task_vectors_times_lambda():
    base, a, b = T([1.0, 1.0]), T([2.0, 1.0]), T([1.0, 3.0])
    out = merge_tensors("task_arithmetic", [a, b], base, weight=[0.5, 1.0], **{"lambda": 2.0})
    assert close(out, [1 + 2 * 0.5, 1 + 2 * 2.0])


# -- TIES ------------------------------------------------------------------------------------------


def test_ties_trims_by_magnitude_elects_signs_and_averages_agreeing_entries():
    # d1 keeps [_, -2, 3, _], d2 keeps [-1.5, _, 2, _]; elected signs (-, -, +, +);
    # agreeing: entry0 {d2}, entry1 {d1}, entry2 {d1, d2}, entry3 none -> divisor 1
    base = torch.zeros(4)
    d1, d2 = T([1.0, -2.0, 3.0, 0.1]), T([-1.5, -1.0, 2.0, 0.2])
    out = merge_tensors("ties", [d1, d2], base, weight=[1, 1], density=[0.5, 0.5])
    assert close(out, [-1.5, -2.0, 2.5, 0.0])


def test_ties_keeps_only_the_majority_sign():
    base = torch.zeros(3)
    a, b, c = T([1.0, 1.0, -5.0]), T([1.0, -3.0, 1.0]), T([-1.0, 1.0, 1.0])
    out = merge_tensors("ties", [a, b, c], base, weight=[1, 1, 1], density=[1, 1, 1])
    # entry0 sum +1 -> keep +1,+1 -> 1; entry1 sum -1 -> keep -3 -> -3; entry2 sum -3 -> keep -5
    assert close(out, [1.0, -3.0, -5.0])


def test_ties_of_identical_experts_returns_the_expert():
    base, x = torch.randn(50), torch.randn(50)
    out = merge_tensors("ties", [x, x, x], base, weight=[0.2, 0.3, 0.5], density=[1, 1, 1])
    assert close(out, x, 1e-5)


# -- DARE ------------------------------------------------------------------------------------------


def test_dare_with_density_one_equals_its_undropped_counterpart():
    base, a, b = torch.randn(20), torch.randn(20), torch.randn(20)
    w = [0.7, 0.4]
    ta = merge_tensors("task_arithmetic", [a, b], base, weight=w)
    assert close(merge_tensors("dare_linear", [a, b], base, weight=w, density=[1, 1]), ta)
    ties = merge_tensors("ties", [a, b], base, weight=w, density=[1, 1], normalize=False)
    assert close(merge_tensors("dare_ties", [a, b], base, weight=w, density=[1, 1]), ties)


def test_dare_is_bit_for_bit_reproducible_from_its_seed():
    base, a = torch.zeros(20000), torch.randn(20000)
    one = merge_tensors("dare_linear", [a], base, weight=[1], density=[0.3], seed=5)
    assert torch.equal(one, merge_tensors("dare_linear", [a], base, weight=[1], density=[0.3], seed=5))
    assert not torch.equal(one, merge_tensors("dare_linear", [a], base, weight=[1], density=[0.3], seed=6))
    kept = (one != 0).float().mean().item()
    assert 0.29 < kept < 0.31  # 0.3 +- 3 standard deviations


def test_dare_rescale_matches_l1_by_default_and_offers_inverse_density():
    base, a = torch.zeros(1000), torch.randn(1000)
    l1 = merge_tensors("dare_linear", [a], base, weight=[1], density=[0.3], seed=1)
    assert math.isclose(l1.abs().sum().item(), a.abs().sum().item(), rel_tol=1e-5)
    inv = merge_tensors(
        "dare_linear", [a], base, weight=[1], density=[0.3], seed=1, rescale_norm="inverse_density"
    )
    kept = inv != 0
    assert close(inv[kept], a[kept] / 0.3, 1e-5)
    raw = merge_tensors("dare_linear", [a], base, weight=[1], density=[0.3], seed=1, rescale=False)
    assert close(raw[kept], a[kept])


# -- sparsification --------------------------------------------------------------------------------


def test_magnitude_mask_keeps_floor_density_times_numel_largest_but_at_least_one():
    d = T([0.1, -5.0, 3.0, 0.2, -0.3])
    assert magnitude_mask(d, 0.4).tolist() == [False, True, True, False, False]
    assert magnitude_mask(d, 0.01).tolist() == [False, True, False, False, False]


def test_breadcrumbs_drops_the_outliers_and_the_smallest():
    d = torch.arange(1.0, 11.0)
    # keep 5, drop the single largest (10): keep 5..9
    assert outlier_mask(d, 0.5, 0.1).nonzero().flatten().tolist() == [4, 5, 6, 7, 8]


def test_breadcrumbs_with_too_few_entries_for_an_outlier_keeps_the_largest_not_nothing():
    """mergekit <= 0.1.4 emptied the whole delta when floor(gamma * numel) == 0; we do not."""
    d = torch.arange(1.0, 11.0)
    assert outlier_mask(d, 0.5, 0.01).nonzero().flatten().tolist() == [5, 6, 7, 8, 9]


def test_della_keeps_large_entries_more_often():
    g = torch.Generator().manual_seed(0)
    d = torch.arange(1.0, 1001.0).repeat(20, 1)
    mask = della_mask(d, 0.5, 0.4, g).float().mean(dim=0)
    assert mask[:100].mean() < 0.2 and mask[-100:].mean() > 0.8


def test_della_at_density_zero_drops_everything_and_refuses_probabilities_outside_0_1():
    # mergekit: density 0 -> no task vector; density +- epsilon must lie in (0, 1)
    g = torch.Generator().manual_seed(0)
    base, x = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    assert not della_mask(x - base, 0.0, 0.15, g).any()
    merged = merge_tensors("della_linear", [x], base, weight=[1.0], density=[0.0], epsilon=[0.0], seed=1)
    assert torch.equal(merged, base)
    with pytest.raises(
        EvomergeError, match=r"tensors\[1\]: density 0.1 and epsilon 0.15 .* outside \(0, 1\)"
    ):
        merge_tensors("della", [x, x], base, weight=[1.0, 1.0], density=[0.5, 0.1], seed=1)
    with pytest.raises(EvomergeError, match="density 0.9 and epsilon 0.15"):
        merge_tensors("della", [x], base, weight=[1.0], density=[0.9], seed=1)
    assert merge_tensors("della", [x], base, weight=[1.0], density=[0.5], seed=1).shape == base.shape


def test_random_mask_and_rescale_with_density_one_keep_everything():
    d = torch.randn(10)
    assert random_mask(d, 1.0, None).all()
    assert rescale_factor(torch.zeros(10), d, torch.ones(10, dtype=torch.bool), "l1", 1.0) == 1.0


def test_rescale_factor_by_hand():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    x = base + torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = torch.tensor([True, False, True, False])
    assert rescale_factor(base, x, kept, "l1", 0.5) == pytest.approx(10 / 4)  # |d| 10, kept 4
    assert rescale_factor(base, x, kept, "inverse_density", 0.25) == 4.0
    assert rescale_factor(base, x, kept, "none", 0.25) == 1.0
    assert rescale_factor(base, x, torch.zeros(4, dtype=torch.bool), "l1", 0.5) == 1.0  # all dropped


def test_random_masks_depend_on_the_seed_alone(monkeypatch):
    # 3000 entries in streams of 128 (the last one short), drawn on 1 thread and on several:
    # stream j is PCG64 keyed by (seed, j), whatever thread draws it
    monkeypatch.setattr(sparsify, "STREAM", 128)
    like = torch.empty(3, 1000)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    raw = np.concatenate([
        np.random.PCG64(np.random.SeedSequence([seed, j])).random_raw(64).view(np.uint32)[: min(128, 3000 - 128 * j)]
        for j in range(24)
    ])  # fmt: skip
    expected = torch.from_numpy(raw < np.uint32(int(0.3 * 2**32))).reshape(3, 1000)
    threads = torch.get_num_threads()
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            assert torch.equal(random_mask(like, 0.3, torch.Generator().manual_seed(5)), expected)
    finally:
        torch.set_num_threads(threads)
    assert 0.25 < expected.float().mean() < 0.35
    draws = uniform((3, 1000), torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(draws, torch.from_numpy((raw >> 8).astype(np.float32) / 2**24).reshape(3, 1000))
    assert draws.min() >= 0 and draws.max() < 1


# -- spherical -------------------------------------------------------------------------------------


def test_slerp_returns_the_endpoints_at_t_0_and_1():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert close(merge_tensors("slerp", [b], a, t=0.0), a, 1e-6)
    assert close(merge_tensors("slerp", [b], a, t=1.0), b, 1e-6)


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle():
    out = merge_tensors("slerp", [T([0.0, 1.0])], T([1.0, 0.0]), t=0.5)
    assert close(out, [math.sqrt(0.5), math.sqrt(0.5)])


def test_slerp_of_collinear_vectors_is_linear():
    a = T([1.0, 2.0])
    assert close(merge_tensors("slerp", [3 * a], a, t=0.25), 1.5 * a)


@settings(max_examples=30, deadline=None)
@given(t=st.floats(0, 1), seed=st.integers(0, 1000))
def test_slerp_is_symmetric_under_swapping_ends(t, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    assert close(merge_tensors("slerp", [b], a, t=t), merge_tensors("slerp", [a], b, t=1 - t), 1e-9)


def test_nuslerp_weights_pick_the_endpoints():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert close(merge_tensors("nuslerp", [a, b], weight=[1, 0]), a, 1e-6)
    assert close(merge_tensors("nuslerp", [a, b], weight=[0, 1]), b, 1e-6)


def test_nuslerp_between_orthogonal_vectors_by_hand():
    # cos = 0, theta = pi/2: slerp(t) = sin((1-t) pi/2) a + sin(t pi/2) b, with t = w_b / (w_a + w_b)
    a, b = T([1.0, 0.0]), T([0.0, 2.0])
    assert close(merge_tensors("nuslerp", [a, b], weight=[1, 1]), [math.sqrt(0.5), 2 * math.sqrt(0.5)])
    quarter = [math.sin(3 * math.pi / 8), 2 * math.sin(math.pi / 8)]  # t = 1/4
    assert close(merge_tensors("nuslerp", [a, b], weight=[3, 1]), quarter)


def test_multislerp_of_orthogonal_vectors_by_hand():
    # the weighted mean direction (tangents cancel for equal weights), scaled by the weighted
    # mean of the norms: 0.5 * 2 + 0.5 * 1 = 1.5
    out = merge_tensors("multislerp", [T([2.0, 0.0]), T([0.0, 1.0])], weight=[1, 1])
    assert close(out, [1.5 * math.sqrt(0.5), 1.5 * math.sqrt(0.5)], 1e-5)


def test_multislerp_and_karcher_of_identical_tensors_return_them():
    x = torch.randn(6, 3)
    assert close(merge_tensors("multislerp", [x, x, x], weight=[1, 2, 3]), x, 1e-5)
    assert close(merge_tensors("karcher", [x, x]), x, 1e-5)


def test_karcher_mean_of_orthogonal_unit_vectors_is_their_normalized_midpoint():
    out = merge_tensors("karcher", [T([1.0, 0.0]), T([0.0, 1.0])])
    assert close(out, [math.sqrt(0.5), math.sqrt(0.5)], 1e-5)


# -- model stock, SCE, passthrough -----------------------------------------------------------------


def test_model_stock_with_identical_experts_returns_them():
    base, x = torch.randn(5, 5), torch.randn(5, 5)
    assert close(merge_tensors("model_stock", [x, x], base), x, 1e-5)


def test_model_stock_with_orthogonal_task_vectors_returns_the_base():
    base = T([1.0, 1.0])
    out = merge_tensors("model_stock", [T([2.0, 1.0]), T([1.0, 2.0])], base)
    assert close(out, base)  # cos = 0 -> t = 0


def test_sce_of_a_single_expert_is_the_expert():
    base, x = torch.randn(10), torch.randn(10)
    assert close(merge_tensors("sce", [x], base), x, 1e-5)


def test_sce_by_hand_with_and_without_variance_selection():
    base = torch.zeros(4)
    x1, x2 = T([1.0, 2.0, 0.0, -3.0]), T([1.0, -2.0, 0.0, 3.0])
    # no selection: elected signs + + + + (ties count +), energies equal (weights 1/2 each);
    # entry 1: only x1 agrees -> 2; entry 2: nobody (zeros never agree) -> 0; entry 3: x2 -> 3
    assert close(merge_tensors("sce", [x1, x2], base), [1.0, 2.0, 0.0, 3.0])
    # select_topk 0.5: variances 0, 4, 0, 9 -> 2 nonzero, keep int(2 * 0.5) = 1 entry: the last
    assert close(merge_tensors("sce", [x1, x2], base, select_topk=0.5), [0.0, 0.0, 0.0, 3.0])


def test_breadcrumbs_ties_by_hand():
    # n = 10, density 0.5, gamma 0.1: keep ranks 2-6 by magnitude (the largest is an outlier),
    # then elect signs and sum the agreeing entries (normalize is off by default)
    x1 = torch.arange(1.0, 11.0)  # keeps 5, 6, 7, 8, 9
    x2 = -torch.arange(10.0, 0.0, -1.0)  # keeps -9, -8, -7, -6, -5
    out = merge_tensors(
        "breadcrumbs_ties", [x1, x2], torch.zeros(10), weight=[1, 1], density=[0.5, 0.5], gamma=[0.1, 0.1]
    )
    assert close(out, [0.0, -9.0, -8.0, -7.0, -6.0, 6.0, 7.0, 8.0, 9.0, 0.0])


def test_passthrough_copies_and_scales():
    x = torch.randn(3)
    assert torch.equal(merge_tensors("passthrough", [x]), x)
    assert close(merge_tensors("passthrough", [x], scale=[2.0]), 2 * x)


# -- laws ------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.01, 10), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_normalized_linear_merge_is_a_convex_combination(weights, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, generator=g, dtype=torch.float64) for _ in weights]
    out = merge_tensors("linear", xs, weight=weights)
    stacked = torch.stack(xs)
    assert (out >= stacked.min(0).values - 1e-9).all() and (out <= stacked.max(0).values + 1e-9).all()


@settings(max_examples=30, deadline=None)
@given(lam=st.floats(-2, 2), seed=st.integers(0, 99))
def test_task_arithmetic_is_linear_in_lambda(lam, seed):
    g = torch.Generator().manual_seed(seed)
    base, a, b = (torch.randn(16, generator=g, dtype=torch.float64) for _ in range(3))
    one = merge_tensors("task_arithmetic", [a, b], base, weight=[1, 1])
    out = merge_tensors("task_arithmetic", [a, b], base, weight=[1, 1], **{"lambda": lam})
    assert close(out, base + lam * (one - base), 1e-9)


@pytest.mark.parametrize("method", sorted(EXPECTED - {"passthrough"}))
def test_merging_one_model_into_itself_changes_nothing(method):
    """Every method, given copies of one tensor (and it as base), returns that tensor."""
    x = torch.randn(4, 6)
    m = METHODS[method]
    n = 2 if m.min_models <= 2 <= (m.max_models or 2) else m.min_models
    params = {p.name: [1.0] * n for p in m.params if p.scope.value == "per_model" and p.name == "weight"}
    if method == "slerp":
        params["t"] = 0.3
    if method in ("della", "della_linear"):
        params["epsilon"] = [0.1] * n
        params["density"] = [0.5] * n
    base = None if m.base.value == "none" else x
    assert close(merge_tensors(method, [x] * n, base, **params), x, 1e-5)


# -- errors ------------------------------------------------------------------------------------------


def test_wrong_model_counts_and_parameters_are_clear_errors():
    x = torch.zeros(2)
    with pytest.raises(EvomergeError, match="slerp takes exactly 1 model"):
        merge_tensors("slerp", [x, x], x, t=0.5)
    with pytest.raises(EvomergeError, match="ties needs a base_model"):
        merge_tensors("ties", [x], weight=[1])
    with pytest.raises(EvomergeError, match="density=1.5 is outside its allowed range"):
        merge_tensors("ties", [x], x, weight=[1], density=[1.5])
    with pytest.raises(EvomergeError, match="unknown parameter"):
        merge_tensors("linear", [x], weight=[1], density=[1])
    with pytest.raises(EvomergeError, match="unknown merge_method 'tie'"):
        merge_tensors("tie", [x], x)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_evaluating_in_blocks_gives_the_whole_tensor_result(method, monkeypatch):
    # 37 x 29 entries in blocks of 7 (the last one short) against one block for everything.
    m = METHODS[method]
    n = 1 if m.max_models == 1 else 2 if m.max_models == 2 else 3
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(37, 29, generator=g) for _ in range(n)]
    base = None if m.base.value == "none" else torch.randn(37, 29, generator=g)
    names = {p.name for p in m.params}
    params = {"weight": [0.6, 0.3, 0.8][:n]} if "weight" in names else {}
    params |= {"density": [0.5, 0.4, 0.7][:n]} if "density" in names else {}
    params |= {"t": 0.3} if method == "slerp" else {}
    whole = merge_tensors(method, xs, base, seed=3, **params)
    monkeypatch.setattr(blockwise, "BLOCK", 7)
    blocked = merge_tensors(method, xs, base, seed=3, **params)
    if m.param("rescale_norm") is not None and m.param("rescale").default:
        # the L1 norms of the rescale are summed block by block: a different order of addition
        assert torch.allclose(blocked, whole, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(blocked, whole)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_every_method_runs_on_cuda_and_matches_cpu(method):
    m = METHODS[method]
    n = 1 if m.max_models == 1 else 2
    params = {p.name: [0.5] * n for p in m.params if p.scope.value == "per_model" and p.name in ("weight",)}
    if method == "slerp":
        params["t"] = 0.3
    xs = [torch.randn(8, 8) for _ in range(n)]
    base = None if m.base.value == "none" else torch.randn(8, 8)
    cpu = merge_tensors(method, xs, base, **params)
    gpu = merge_tensors(method, [x.cuda() for x in xs], base.cuda() if base is not None else None, **params)
    assert gpu.is_cuda
    if not m.stochastic:
        assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The rule keeping the k largest entries of ``values``, applied to them."""
    itself = blockwise.Elementwise(lambda v: v, [values])
    return sparsify.Ranked(itself, sparsify.top_k(itself, k)).mask()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), k=st.integers(0, 3000), levels=st.integers(1, 50), seed=st.integers(0, 99))
def test_top_k_selects_exactly_the_k_largest_with_lowest_index_ties(n, k, levels, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(levels, (n,), generator=g).float()  # many ties
    mask = top_k_mask(values, k)
    assert int(mask.sum()) == min(k, n)
    # reference: stable sort by descending value, ties by ascending index
    order = sorted(range(n), key=lambda i: (-values[i].item(), i))[: min(k, n)]
    assert set(mask.nonzero().flatten().tolist()) == set(order)


def test_top_k_on_large_tensors_matches_a_full_sort():
    values = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)).abs()
    for k in [1, 1000, 500_000, 999_999]:
        expected = torch.zeros(values.numel(), dtype=torch.bool)
        expected[torch.argsort(values, descending=True, stable=True)[:k]] = True
        assert torch.equal(top_k_mask(values, k), expected), k


def _sorted_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest by a full stable sort (ties: lowest index first)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.argsort(values, descending=True, stable=True)[:k]] = True
    return mask


@pytest.mark.parametrize("slack", [0.01, 0.0])  # 0: the bracket usually misses, the fallback runs
def test_rank_rules_applied_block_by_block_match_a_full_sort(slack, monkeypatch):
    # bf16 inputs: the task vectors' magnitudes take few distinct values (many ties), and
    # 700K entries in blocks of 4099 take the sampled-bracket path with positions across blocks
    monkeypatch.setattr(blockwise, "BLOCK", 4099)
    monkeypatch.setattr(sparsify, "_SLACK", slack)
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(700, 1000, generator=g) * 0.02).bfloat16()
    x = (base.float() + torch.randn(700, 1000, generator=g) * 0.002).bfloat16()
    magnitude = sparsify.task_vector_magnitude(base, x)
    flat = (x.float() - base.float()).abs().reshape(-1)
    assert flat.unique().numel() < flat.numel() / 50  # heavy ties
    n = flat.numel()
    for density in [0.001, 0.3, 0.5, 0.9]:
        k = sparsify.keep_count(n, density)
        got = sparsify.magnitude_rule(magnitude, density).mask().reshape(-1)
        assert torch.equal(got, _sorted_top(flat, k)), density
    keep, outliers = int(0.5 * n), int(0.01 * n)
    got = sparsify.outlier_rule(magnitude, 0.5, 0.01).mask().reshape(-1)
    assert torch.equal(got, _sorted_top(flat, keep + outliers) & ~_sorted_top(flat, outliers))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "breadcrumbs"])
def test_rank_based_merges_of_large_tensors_do_not_depend_on_the_block_size(method, monkeypatch):
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(600, 1000, generator=g) * 0.02).bfloat16()
    xs = [(base.float() + torch.randn(600, 1000, generator=g) * 0.002).bfloat16() for _ in range(2)]
    params = {"weight": [0.7, 0.5], "density": [0.5, 0.3]}
    whole = merge_tensors(method, xs, base, **params)
    monkeypatch.setattr(blockwise, "BLOCK", 4099)
    assert torch.equal(merge_tensors(method, xs, base, **params), whole)
    # the same masks, made whole and applied to the experts beforehand, give the same merge
    # through the undropped counterparts (TIES, DARE-linear at density 1)
    deltas = [x.float() - base.float() for x in xs]
    if method == "ties":
        masks = [sparsify.magnitude_mask(d, p) for d, p in zip(deltas, params["density"], strict=True)]
    else:
        masks = [sparsify.outlier_mask(d, p, 0.01) for d, p in zip(deltas, params["density"], strict=True)]
    kept = [torch.where(m, x, base) for m, x in zip(masks, xs, strict=True)]
    if method == "breadcrumbs":
        undropped = merge_tensors(
            "dare_linear", kept, base, weight=params["weight"], density=[1.0, 1.0], seed=0
        )
    else:
        normalize = METHODS[method].param("normalize").default
        undropped = merge_tensors("ties", kept, base, weight=params["weight"], normalize=normalize)
    assert torch.equal(undropped, whole)
