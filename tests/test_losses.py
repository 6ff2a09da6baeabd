"""BlES and sequence-level load-balancing losses (cosmoes.losses) against hand-computed values.

Router logits are built as log-probabilities, so softmax(R) gives back exactly the probabilities used in the
hand computations below.
"""

import pytest
import torch

from cosmoes.errors import CosmoesError
from cosmoes.losses import bles_loss, bles_loss_layers, load_balancing_loss, load_balancing_loss_layers
from cosmoes.routing import expert_replacement_rate, selected_experts


def logits_from_probs(rows):
    return torch.tensor(rows, dtype=torch.float32).log()


# B=1, T=4, E=3. Top-1 experts: 0, 0, 1, 2. Top-2 sets: {0,1}, {0,1}, {1,2}, {1,2}.
RAMP_PROBS = [[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]]]
# L (Eq. 6): t0->t1: .1+.1+0 = .2; t1->t2: .4+.2+.2 = .8; t2->t3: .1+.2+.3 = .6; L = 1.6, l_norm = 1.6/(B*T=4) = 0.4
# A constant sequence has no replacements and L = 0.
CONST_PROBS = [[[0.5, 0.3, 0.2]] * 4]


def test_bles_top1_by_hand():
    # K=1: H = 2 + 2 = 4 -> h_norm = floor(4/2)/(1*1*3) = 2/3; loss = 2/3 * 0.4 = 4/15
    loss, h_norm, l_norm = bles_loss(logits_from_probs(RAMP_PROBS), top_k=1)
    assert h_norm.item() == pytest.approx(2 / 3)
    assert l_norm.item() == pytest.approx(0.4)
    assert loss.item() == pytest.approx(4 / 15)


def test_bles_top2_by_hand():
    # K=2: only t1->t2 changes the set (0 leaves, 2 enters): H = 2 -> h_norm = 1/(1*2*3) = 1/6; loss = 0.4/6
    loss, h_norm, l_norm = bles_loss(logits_from_probs(RAMP_PROBS), top_k=2)
    assert h_norm.item() == pytest.approx(1 / 6)
    assert l_norm.item() == pytest.approx(0.4)
    assert loss.item() == pytest.approx(0.4 / 6)


def test_bles_temperature_scales_logits():
    # W = softmax(tau * R): halving the logits and using tau=2 must give the same W and so the same loss.
    loss, h_norm, l_norm = bles_loss(logits_from_probs(RAMP_PROBS) / 2, top_k=1, temperature=2.0)
    assert (loss.item(), h_norm.item(), l_norm.item()) == pytest.approx((4 / 15, 2 / 3, 0.4))


def test_bles_batch_by_hand():
    # B=2 (RAMP, CONST), K=1: H = 4 + 0 -> h_norm = 2/(2*1*3) = 1/3; L = 1.6 + 0 -> l_norm = 1.6/(2*4) = 0.2
    loss, h_norm, l_norm = bles_loss(logits_from_probs(RAMP_PROBS + CONST_PROBS), top_k=1)
    assert h_norm.item() == pytest.approx(1 / 3)
    assert l_norm.item() == pytest.approx(0.2)
    assert loss.item() == pytest.approx(1 / 15)


def test_bles_constant_routing_is_zero():
    loss, h_norm, l_norm = bles_loss(logits_from_probs(CONST_PROBS), top_k=2)
    assert loss.item() == h_norm.item() == 0.0
    assert l_norm.item() == pytest.approx(0.0, abs=1e-7)


def test_bles_single_token_is_zero_and_backward_safe():
    logits_BTE = torch.randn(3, 1, 4, requires_grad=True)
    loss, h_norm, l_norm = bles_loss(logits_BTE, top_k=2)
    assert loss.item() == h_norm.item() == l_norm.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits_BTE.grad) == 0


def test_bles_l_norm_gradient_by_hand():
    # B=1, T=2, E=2: p0 = [.8, .2], p1 = [.3, .7]. l_norm = (|p1_0 - p0_0| + |p1_1 - p0_1|)/2, both diffs +-.5.
    # With E=2, dp_t0/dR_t0 = p_t0*p_t1 = -dp_t1/dR_t0. Token 1: d/dR_10 = (1/2)(-1*.21 + 1*(-.21)) = -.21;
    # token 0: d/dR_00 = (1/2)(-(-1)*.16 - 1*(-.16)) = .16; the other expert's gradient is the negative.
    logits_BTE = logits_from_probs([[[0.8, 0.2], [0.3, 0.7]]]).requires_grad_()
    _, h_norm, l_norm = bles_loss(logits_BTE, top_k=1)
    assert l_norm.item() == pytest.approx(0.5)
    l_norm.backward()
    assert torch.allclose(logits_BTE.grad, torch.tensor([[[0.16, -0.16], [-0.21, 0.21]]]), atol=1e-6)


def test_bles_gradient_flows_through_l_norm_only():
    logits_BTE = logits_from_probs(RAMP_PROBS).requires_grad_()
    loss, h_norm, l_norm = bles_loss(logits_BTE, top_k=1)
    assert not h_norm.requires_grad and h_norm.grad_fn is None
    assert l_norm.requires_grad
    (grad_loss,) = torch.autograd.grad(loss, logits_BTE, retain_graph=True)
    (grad_l,) = torch.autograd.grad(l_norm, logits_BTE)
    # h_norm is a constant factor: d loss = h_norm * d l_norm
    assert torch.count_nonzero(grad_l) > 0
    assert torch.allclose(grad_loss, h_norm * grad_l)


def test_bles_h_norm_agrees_with_exrep_metric():
    logits_BTE = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(1))
    _, h_norm, _ = bles_loss(logits_BTE, top_k=2, temperature=0.7)
    exrep = expert_replacement_rate(selected_experts(logits_BTE, 2, temperature=0.7), 8)
    assert h_norm.item() == pytest.approx(exrep)


def test_bles_layers_is_mean_over_layers():
    # Layer RAMP: loss 4/15, h 2/3; layer CONST: loss 0, h 0 -> mean loss 2/15, mean h 1/3.
    layers = (logits_from_probs(RAMP_PROBS).requires_grad_(), logits_from_probs(CONST_PROBS))
    loss, h_norm = bles_loss_layers(layers, top_k=1)
    assert loss.item() == pytest.approx(2 / 15)
    assert h_norm.item() == pytest.approx(1 / 3)
    loss.backward()
    assert torch.count_nonzero(layers[0].grad) > 0


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_load_balancing_uniform_is_one(top_k):
    # P = 1/E everywhere, Σ f = 1 -> E * Σ f_e / E = 1
    assert load_balancing_loss(torch.zeros(2, 5, 4), top_k).item() == pytest.approx(1.0)


def test_load_balancing_full_collapse_is_num_experts():
    # K=1, every token sends everything to expert 0: f = [1, 0, 0], P ≈ [1, 0, 0] -> E * 1 = 3
    logits_BTE = torch.tensor([100.0, 0.0, 0.0]).expand(2, 6, 3)
    assert load_balancing_loss(logits_BTE, 1).item() == pytest.approx(3.0)


def test_load_balancing_is_per_sequence_by_hand():
    # E=2, K=1, T=2.
    # seq 0: p = [.8,.2], [.6,.4] -> picks 0, 0: f = [1, 0], P = [.7, .3] -> 2 * .7 = 1.4
    # seq 1: p = [.1,.9], [.3,.7] -> picks 1, 1: f = [0, 1], P = [.2, .8] -> 2 * .8 = 1.6
    # mean over sequences = 1.5. (Pooling the batch would give f = [.5,.5], P = [.45,.55] -> 1.0: balanced
    # across sequences but not within them, which the sequence-level loss must not reward.)
    logits_BTE = logits_from_probs([[[0.8, 0.2], [0.6, 0.4]], [[0.1, 0.9], [0.3, 0.7]]])
    assert load_balancing_loss(logits_BTE, 1).item() == pytest.approx(1.5)


def test_load_balancing_gradient_by_hand():
    # B=T=1, E=3, K=2, p = [.5, .3, .2]: top-2 = {0, 1} -> f = [.5, .5, 0]; loss = 3 * (.25 + .15) = 1.2.
    # f is constant, so d loss / d R_j = E * p_j * (f_j - Σ_e f_e p_e) with Σ f p = .4:
    # 3 * [.5 * .1, .3 * .1, .2 * -.4] = [.15, .09, -.24]
    logits_BTE = logits_from_probs([[[0.5, 0.3, 0.2]]]).requires_grad_()
    loss = load_balancing_loss(logits_BTE, 2)
    assert loss.item() == pytest.approx(1.2)
    loss.backward()
    assert torch.allclose(logits_BTE.grad, torch.tensor([[[0.15, 0.09, -0.24]]]), atol=1e-6)


def test_load_balancing_layers_cannot_be_gamed_across_layers():
    # Fig. 4 with 2 layers and 2 experts: layer 0 always uses expert 0, layer 1 always expert 1. The model-level
    # count would look perfectly balanced (50:50 -> 1.0); per layer each is a full collapse (≈ E = 2), mean 2.
    layer0_BTE = torch.tensor([20.0, 0.0]).expand(1, 5, 2)
    layer1_BTE = torch.tensor([0.0, 20.0]).expand(1, 5, 2)
    assert load_balancing_loss_layers([layer0_BTE, layer1_BTE], 1).item() == pytest.approx(2.0, abs=1e-6)
    # and the mean is a plain mean of the per-layer values: (2 + 1) / 2
    assert load_balancing_loss_layers([layer0_BTE, torch.zeros(1, 5, 2)], 1).item() == pytest.approx(1.5, abs=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: bles_loss(torch.zeros(1, 4, 3), top_k=4),
        lambda: bles_loss(torch.zeros(1, 4, 3), top_k=0),
        lambda: bles_loss(torch.zeros(1, 4, 3), top_k=1, temperature=0.0),
        lambda: bles_loss(torch.zeros(4, 3), top_k=1),
        lambda: bles_loss(torch.zeros(1, 4, 3, dtype=torch.long), top_k=1),
        lambda: bles_loss_layers(torch.zeros(2, 4, 3), top_k=1),  # bare tensor, not a per-layer list
        lambda: bles_loss_layers([], top_k=1),
        lambda: load_balancing_loss(torch.zeros(1, 0, 3), top_k=1),
        lambda: load_balancing_loss_layers((), top_k=1),
    ],
)
def test_bad_input_raises_cosmoes_error(call):
    with pytest.raises(CosmoesError):
        call()


def test_losses_train_the_routers_of_a_real_model():
    from cosmoes.config import get_preset
    from cosmoes.model import Transformer, init_weights

    cfg = get_preset("tiny-moe")
    model = init_weights(Transformer(cfg), seed=0)
    input_ids_BT = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    router_logits = model(input_ids_BT).router_logits
    bles, h_norm = bles_loss_layers(router_logits, cfg.top_k, cfg.router_temperature)
    balance = load_balancing_loss_layers(router_logits, cfg.top_k)
    (bles + balance).backward()
    assert 0.0 <= h_norm.item() <= 1.0 and 0.0 < balance.item() <= cfg.num_experts
    for layer in model.layers:
        assert torch.count_nonzero(layer.feed_forward.router.weight.grad) > 0
