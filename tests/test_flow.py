import torch

from workers.differnet.config import D4
from workers.differnet.flow import build_flow, negative_log_likelihood
from workers.differnet.views import apply_d4, letterbox, undo_d4


def _trained_looking(flow):
    # Zero-initialised subnets make the flow an identity; perturb so the tests mean something.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            if p.is_floating_point():  # FrEIA keeps its permutations as integer parameters
                p.add_(0.1 * torch.randn_like(p))
    return flow


def test_inverting_the_flow_recovers_its_input():
    flow = _trained_looking(build_flow(16, n_blocks=4, width=32)).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    z, _ = flow(x)
    x_back, _ = flow(z, rev=True)
    assert not torch.allclose(z, x)
    assert torch.allclose(x_back, x, atol=1e-8)


def test_the_log_determinant_matches_autograd():
    flow = _trained_looking(build_flow(6, n_blocks=3, width=16)).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    _, log_jac = flow(x)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[0])
    assert torch.allclose(log_jac[0], torch.linalg.slogdet(jac).logabsdet, atol=1e-8)


def test_nll_is_lowest_at_the_mode():
    flow = build_flow(8, n_blocks=2, width=8)  # identity at initialisation
    near, far = torch.zeros(1, 8), torch.full((1, 8), 3.0)
    assert negative_log_likelihood(flow, near) < negative_log_likelihood(flow, far)


def test_each_d4_transform_is_undone_exactly():
    x = torch.arange(2 * 5 * 5.0).view(2, 5, 5)
    outputs = {tuple(apply_d4(x, t).flatten().tolist()) for t in range(len(D4))}
    assert len(outputs) == 8
    for t in range(len(D4)):
        assert torch.equal(undo_d4(apply_d4(x, t), t), x)


def test_letterbox_keeps_the_aspect_ratio_and_marks_the_product():
    import numpy as np

    pixels, mask, box = letterbox(np.zeros((50, 200, 3), np.uint8), 64)
    assert pixels.shape == (3, 64, 64)
    assert (box.height, box.width) == (16, 64)
    assert mask.sum() == 16 * 64
