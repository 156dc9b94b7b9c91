"""HARC router calibration: the CG solver against a direct solve, and layer-by-layer calibration of a model."""

import pytest
import torch

from recipes.merge.harc import (
    HARCOptions,
    RouterCalibration,
    calibrate_routers,
    conjugate_gradient,
    moe_layers,
    router_inputs,
    routing_agreement,
    routing_ids,
    solve_router,
)
from tests.helpers import tiny_config
from training.build import build_model
from training.config import validate


def random_problem(seed=0, D=6, E=4, sizes=(50, 70)):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in sizes]
    sources = [torch.randn(E, D, generator=g, dtype=torch.float64) for _ in sizes]
    return inputs, sources


def explicit_system(inputs, sources, damping):
    """A and b written out as (E·D)² and E·D arrays, independently of the matrix-free operator."""
    E, D = sources[0].shape
    A, b = torch.zeros(E * D, E * D, dtype=torch.float64), torch.zeros(E * D, dtype=torch.float64)
    for X, W in zip(inputs, sources):
        r = (X @ W.T).softmax(-1)
        H_NEE = torch.diag_embed(r) - r.unsqueeze(-1) * r.unsqueeze(-2)
        A_d = torch.einsum("nef,ni,nj->eifj", H_NEE, X, X).reshape(E * D, E * D) / len(X)
        diag = torch.diag(torch.diagonal(A_d))
        if damping > 1:
            A_d = A_d + (damping - 1) * diag
        elif damping < 1:
            A_d = damping * A_d + (1 - damping) * diag
        A, b = A + A_d, b + A_d @ W.reshape(-1)
    return A, b


def test_matrix_free_operator_equals_the_explicit_matrix():
    inputs, sources = random_problem()
    problem = RouterCalibration(inputs, sources, damping=1.3)
    A, b = explicit_system(inputs, sources, 1.3)
    w = torch.randn(A.shape[0], dtype=torch.float64)
    torch.testing.assert_close(problem.matvec(w), A @ w)
    torch.testing.assert_close(problem.rhs(), b)
    torch.testing.assert_close(problem.diagonal(), 1.3 * torch.diagonal(explicit_system(inputs, sources, 1.0)[0]))


@pytest.mark.parametrize("preconditioner", ["none", "diagonal", "kronecker"])
@pytest.mark.parametrize("damping", [0.5, 1.5])
def test_cg_solution_satisfies_the_calibration_equation_and_matches_a_direct_solve(damping, preconditioner):
    inputs, sources = random_problem()
    A, b = explicit_system(inputs, sources, damping)
    direct = torch.linalg.solve(A, b)
    options = HARCOptions(damping=damping, preconditioner=preconditioner, init="average")  # tol 1e-6, ≤100 iterations
    W, info = solve_router(RouterCalibration(inputs, sources, damping), sum(sources) / 2, options)
    # The official stopping rules (recursive residual < tol, or |pᵀAp| < 1e-14) leave the true
    # residual within a few × tol.
    residual = (A @ W.reshape(-1) - b).norm() / b.norm()
    assert residual < 1e-5 and info["relative_residual"] == pytest.approx(residual.item())
    assert (W.reshape(-1) - direct).norm() / direct.norm() < 1e-5
    assert info["iterations"] < 50


def test_undamped_solution_matches_the_direct_solve_up_to_softmax_invariance():
    # γ = 1: A is singular along W + 1vᵀ (adding v·x to every logit leaves softmax unchanged).
    inputs, sources = random_problem(seed=1)
    A, b = explicit_system(inputs, sources, 1.0)
    shift_ED = torch.ones(4, 1, dtype=torch.float64) * torch.randn(1, 6, dtype=torch.float64)  # in A's null space
    W, info = solve_router(RouterCalibration(inputs, sources), shift_ED, HARCOptions())
    assert info["relative_residual"] < 1e-5
    W_direct = torch.linalg.lstsq(A, b.unsqueeze(1), driver="gelsd").solution.view(4, 6)
    X = torch.cat(inputs)
    torch.testing.assert_close((X @ W.T).softmax(-1), (X @ W_direct.T).softmax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W - shift_ED, W_direct, rtol=1e-4, atol=1e-5)  # CG keeps the start's null component


def test_one_domain_recovers_its_source_router_and_cg_stops_on_zero_rhs():
    inputs, sources = random_problem(sizes=(80,))
    W, _ = solve_router(
        RouterCalibration(inputs, sources, 1.2), torch.zeros(4, 6, dtype=torch.float64), HARCOptions(damping=1.2)
    )
    torch.testing.assert_close(W, sources[0], rtol=1e-5, atol=1e-5)
    x0 = torch.ones(3, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: v, torch.zeros(3, dtype=torch.float64), x0)
    assert torch.equal(x, x0) and info["iterations"] == 0


def test_options_are_validated():
    with pytest.raises(ValueError, match="harc.preconditioner='jacobi'"):
        HARCOptions(preconditioner="jacobi")
    with pytest.raises(ValueError, match="harc.init='base'"):
        HARCOptions(init="base")


def _tiny_moe(seed: int):
    torch.manual_seed(seed)
    root = validate(tiny_config("/tmp/unused", "model/ffn=moe", "model.n_layers=3"))
    return build_model(root, 40).eval()


@torch.no_grad()
def test_calibration_runs_layer_by_layer_and_restores_routing():
    base = _tiny_moe(0)
    sources = [_tiny_moe(0), _tiny_moe(0)]
    for i, source in enumerate(sources):  # two "fine-tunes": different router and expert perturbations
        g = torch.Generator().manual_seed(10 + i)
        for p in source.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    merged = _tiny_moe(0)
    merged.load_state_dict(
        {k: (a + b) / 2 for (k, a), b in zip(sources[0].state_dict().items(), sources[1].state_dict().values())}
    )
    g = torch.Generator().manual_seed(1)
    calib = [
        [torch.randint(0, 20, (4, 32), generator=g) for _ in range(3)],
        [torch.randint(20, 40, (4, 32), generator=g) for _ in range(3)],
    ]
    held_out = [[torch.randint(0, 20, (4, 32), generator=g)], [torch.randint(20, 40, (4, 32), generator=g)]]

    def agreement():
        return [
            sum(routing_agreement(routing_ids(merged, b, "cpu"), routing_ids(s, b, "cpu"))) / 3
            for s, b in zip(sources, held_out)
        ]

    before = agreement()
    options = HARCOptions(damping=1.1, init="average")
    stats = calibrate_routers(merged, sources, calib, options, log=lambda _: None)
    after = agreement()
    assert [s["layer"] for s in stats] == [0, 1, 2] and all(s["relative_residual"] < 1e-5 for s in stats)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    # Layer 2 was solved on inputs from the *calibrated* layers 0-1: re-solving it now reproduces it.
    layers, source_layers = moe_layers(merged), [moe_layers(s) for s in sources]
    inputs = [router_inputs(merged, layers[2], batches, "cpu") for batches in calib]
    W_sources = [s[2].router.proj.weight.double() for s in source_layers]
    W_again, _ = solve_router(RouterCalibration(inputs, W_sources, 1.1), sum(W_sources) / 2, options)
    torch.testing.assert_close(layers[2].router.proj.weight, W_again.float(), rtol=1e-4, atol=1e-6)
    assert routing_agreement(routing_ids(base, held_out[0], "cpu"), routing_ids(base, held_out[0], "cpu")) == [1.0] * 3


def test_calibration_needs_linear_softmax_routers():
    torch.manual_seed(0)
    model = build_model(validate(tiny_config("/tmp/unused", "model/ffn=moe", "model.ffn.router=xmoe")), 40)
    with pytest.raises(ValueError, match="linear softmax routers"):
        moe_layers(model)
    dense = build_model(validate(tiny_config("/tmp/unused")), 40)
    with pytest.raises(ValueError, match="needs an MoE model"):
        moe_layers(dense)
