"""AdamW for bf16 weights: Kahan summation and stochastic rounding keep the updates that
plain bf16 loses; Kahan without the noise."""

import copy
import sys

import pytest
import torch

from nanovppo.errors import ConfigError
from nanovppo.optim import Bf16AdamW, _round_nearest, adamw, stochastic_round_


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    lo, hi = 1.0 - 2 ** -8, 1.0  # neighbouring bf16 values
    src = torch.full((200_000,), 1.0 - 1e-3)  # 0.256 of the way from hi down to lo
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    stochastic_round_(dst, src, key=0)
    assert set(dst.float().unique().tolist()) == {lo, hi}
    assert abs(dst.float().mean().item() - src[0].item()) < 2e-5
    assert src.to(torch.bfloat16).float().unique().tolist() == [hi]  # nearest: always up
    # Sign, exact values and special values are kept.
    special = torch.tensor([-(1.0 - 1e-3), 0.5, -0.0, float("inf"), -float("inf"), float("nan")])
    out = torch.empty_like(special, dtype=torch.bfloat16)
    stochastic_round_(out, special, key=1)
    assert out[0].item() in (-lo, -hi)
    assert out[1].item() == 0.5 and out[2].item() == 0.0
    assert out[3].item() == float("inf") and out[4].item() == -float("inf")
    assert torch.isnan(out[5])


def test_round_nearest_is_torchs_cast_to_bf16():
    """Kahan's rounding, done on the bit pattern, against torch's own cast (round half to
    even): random values over 16 decades, both signs, both zeros, infinities, and exact
    ties (1 + 2^-8 lies halfway between 1 and 1 + 2^-7 and goes to the even 1; 1 + 3 x
    2^-8 halfway between 1 + 2^-7 and 1 + 2^-6, and goes to the even 1 + 2^-6)."""
    torch.manual_seed(0)
    x = torch.randn(100_000) * 10.0 ** torch.randint(-8, 8, (100_000,)).float()
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    x = torch.cat([x, ties, special])
    assert torch.equal(_round_nearest(x), x.to(torch.bfloat16).float())
    assert _round_nearest(ties).tolist() == [1.0, 1 + 2 ** -6, -1.0]


def _train(params, opt, steps, target):
    for _ in range(steps):
        opt.zero_grad()
        loss = ((params.float() - target) ** 2).sum()
        loss.backward()
        opt.step()
    return params.detach().float()


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_bf16_weights_follow_fp32_adamw_where_plain_bf16_adamw_stalls(compiled, rounding):
    # Weights near 0.05 (bf16 steps of 2.4e-4 there), learning rate 1e-5 per step.
    torch.manual_seed(0)
    init = 0.05 + 0.005 * torch.rand(4096)
    target = init - 1.0  # every gradient points the same way: Adam moves ~lr per step
    steps, lr = 60, 1e-5
    p32 = init.clone().requires_grad_()
    ref = _train(p32, torch.optim.AdamW([p32], lr=lr, weight_decay=0.0), steps, target)
    p16 = init.to(torch.bfloat16).requires_grad_()
    start = p16.detach().float().clone()
    opt = Bf16AdamW([p16], lr=lr, seed=3, rounding=rounding, compiled=compiled)
    ours = _train(p16, opt, steps, target)
    if rounding == "kahan":  # the weight it carries: the bf16 one and what rounding dropped
        ours = ours + opt.state[p16]["compensation"].float()
    plain16 = init.to(torch.bfloat16).requires_grad_()
    stalled = _train(plain16, torch.optim.AdamW([plain16], lr=lr, weight_decay=0.0),
                     steps, target)
    want = (ref - init).mean().item()  # about -6e-4
    assert want < -5e-4
    assert (stalled - start).abs().max().item() == 0.0  # every update rounded away
    got = (ours - start).mean().item()
    assert abs(got - want) < 0.05 * abs(want)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_kahan_weights_are_fp32_adamw_rounded_to_nearest_where_stochastic_ones_scatter(compiled):
    """What a bf16 forward computes with, against fp32 master weights (which a forward
    rounds to nearest bf16, as autocast does). Weights near 0.05 move 60 x 1e-5 = 6e-4, 2.5
    bf16 steps of 2.44e-4 there. Kahan's buffer holds what rounding dropped to ~2^-9 of a
    step; an error that small puts a weight on the other side of a rounding midpoint from
    fp32's only where fp32's lands within it of one (the bound allows 3% of the weights;
    none did when this was written), and never more than one step away. Stochastic rounding moves a
    weight a whole step with probability 1e-5 / 2.44e-4 = 0.041 a step: after 60 steps 2.5
    +- 1.5 steps, on fp32's nearest value for only ~1/4 of the weights (the bound: 1/2)."""
    torch.manual_seed(0)
    init = (0.05 + 0.005 * torch.rand(4096)).to(torch.bfloat16)
    target = init.float() - 1.0
    steps, lr = 60, 1e-5
    p32 = init.float().requires_grad_()
    ref = _train(p32, torch.optim.AdamW([p32], lr=lr, weight_decay=0.0), steps, target)
    nearest = ref.to(torch.bfloat16).float()
    step = 2.0 ** -12  # bf16's step on [2^-5, 2^-4), where every weight stays
    assert nearest.min() >= 2 ** -5 and nearest.max() < 2 ** -4
    same = {}
    for rounding in ("kahan", "stochastic"):
        p16 = init.clone().requires_grad_()
        got = _train(p16, Bf16AdamW([p16], lr=lr, seed=3, rounding=rounding,
                                    compiled=compiled), steps, target)
        same[rounding] = (got == nearest).float().mean().item()
        if rounding == "kahan":
            assert (got - nearest).abs().max().item() <= step
    assert same["kahan"] >= 0.97
    assert same["stochastic"] < 0.5


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_state_dict_round_trip_resumes_bit_for_bit(rounding):
    torch.manual_seed(0)
    init = torch.randn(1000).to(torch.bfloat16)
    target = torch.randn(1000)

    a = init.clone().requires_grad_()
    opt_a = Bf16AdamW([a], lr=1e-3, weight_decay=0.1, seed=7, rounding=rounding)
    _train(a, opt_a, 4, target)

    b = init.clone().requires_grad_()
    opt_b = Bf16AdamW([b], lr=1e-3, weight_decay=0.1, seed=7, rounding=rounding)
    _train(b, opt_b, 2, target)
    saved_params, saved_state = b.detach().clone(), opt_b.state_dict()
    c = saved_params.clone().requires_grad_()
    opt_c = Bf16AdamW([c], lr=1e-3, weight_decay=0.1, seed=7, rounding=rounding)
    opt_c.load_state_dict(saved_state)
    _train(c, opt_c, 2, target)
    assert torch.equal(a.detach(), c.detach())
    assert opt_c.state[c]["exp_avg"].dtype == torch.bfloat16
    assert ("compensation" in opt_c.state[c]) == (rounding == "kahan")


def test_a_state_saved_under_one_rounding_resumes_under_the_other():
    """hardware.bf16_rounding changed between a run and its resume: a stochastic state gets
    a zero Kahan buffer (nothing was dropped yet) and then rounds as Kahan does; a Kahan
    state resumed under stochastic rounding leaves its buffer unused. After 20 further
    steps of 1e-5 on weights near 0.05 (bf16 step 2.44e-4), the resumed Kahan weights hold
    the whole 2e-4 of the 20 steps (weight plus buffer) to within 1e-6."""
    torch.manual_seed(0)
    init = (0.05 + 0.005 * torch.rand(1000)).to(torch.bfloat16)
    target = init.float() - 1.0
    a = init.clone().requires_grad_()
    opt_a = Bf16AdamW([a], lr=1e-5, seed=7, rounding="stochastic")
    _train(a, opt_a, 3, target)
    b = a.detach().clone().requires_grad_()
    opt_b = Bf16AdamW([b], lr=1e-5, seed=7, rounding="kahan")
    opt_b.load_state_dict(opt_a.state_dict())
    start = b.detach().float().clone()
    _train(b, opt_b, 20, target)
    carried = b.detach().float() + opt_b.state[b]["compensation"].float()
    assert (carried - start + 20 * 1e-5).abs().max().item() < 1e-6
    c = b.detach().clone().requires_grad_()
    opt_c = Bf16AdamW([c], lr=1e-5, seed=7, rounding="stochastic")
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # load_state_dict shares tensors
    d = b.detach().clone().requires_grad_()  # the same state continued under kahan
    opt_d = Bf16AdamW([d], lr=1e-5, seed=7, rounding="kahan")
    opt_d.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    buffer = opt_c.state[c]["compensation"].clone()
    _train(c, opt_c, 2, target)
    _train(d, opt_d, 2, target)
    assert torch.equal(opt_c.state[c]["compensation"], buffer)
    assert not torch.equal(c.detach(), d.detach())  # rounded stochastically, not as kahan


def test_the_compiled_step_is_one_kernel_for_all_sizes_and_learning_rates():
    """Matrices of two sizes, a vector, a learning rate that changes every step: the step
    is compiled twice, once per number of dimensions (a third compile raises here, and the
    optimizer would then have fallen back to its eager step, which ``compiled`` records),
    and it moves the weights as the eager step does."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    sizes = [(64, 32), (7,), (5, 11)]
    targets = [torch.randn(s) for s in sizes]

    def run(compiled):
        params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in sizes]
        opt = Bf16AdamW(params, lr=1e-2, rounding="stochastic", compiled=compiled)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda done: 1.0 - done / 4)
        for _ in range(3):
            opt.zero_grad()
            sum(((p.float() - t) ** 2).sum() for p, t in zip(params, targets)).backward()
            opt.step()
            sched.step()
        return opt, [p.detach().float() for p in params]

    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        opt, fast = run(compiled=True)
    assert opt.compiled
    _, eager = run(compiled=False)
    # Adam moves a weight by about its learning rate a step while the gradient keeps its
    # sign (the targets are ~1 away, the steps ~1e-2): 1e-2 + 7.5e-3 + 5e-3 = 0.0225 in all.
    # Both paths draw the same rounding noise; they may round a value differently only
    # where their fp32 results differ in the last bit: one bf16 step, 2^-7 relative.
    for f, e in zip(fast, eager):
        assert 0.02 < f.abs().mean() < 0.023
        assert (f - e).abs().max() <= 2 ** -7 * f.abs().max()


def test_a_compiler_that_fails_leaves_the_eager_step_and_one_warning(caplog):
    """No working C++ compiler (inductor's on a CPU): the step runs eagerly, says so once,
    and computes what the eager optimizer computes."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    init, grad = torch.randn(1000).to(torch.bfloat16), torch.randn(1000).to(torch.bfloat16)
    params = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    for p in params:
        p.grad = grad.clone()
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}):
        broken = Bf16AdamW([params[0]], lr=1e-3, seed=5, rounding="stochastic")
        broken.step()
        broken.step()
    eager = Bf16AdamW([params[1]], lr=1e-3, seed=5, rounding="stochastic", compiled=False)
    eager.step()
    eager.step()
    assert not broken.compiled
    warnings = [r for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert len(warnings) == 1 and "No working C++ compiler" in warnings[0].getMessage()
    assert torch.equal(params[0], params[1]) and not torch.equal(params[0], init)
    torch._dynamo.reset()


def test_fp32_parameters_get_torch_adamw():
    p = torch.nn.Parameter(torch.zeros(3))
    assert type(adamw([p], lr=1e-3)) is torch.optim.AdamW
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    opt = adamw([p, q], lr=1e-3, bf16_rounding="kahan")
    assert isinstance(opt, Bf16AdamW) and opt.rounding == "kahan"
    with pytest.raises(ConfigError, match="bf16_rounding=None: bf16 weights need kahan"):
        adamw([q], lr=1e-3)


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def test_8bit_adamw_follows_adamw_with_a_quarter_of_its_state():
    """trainer.optimizer=adamw8bit gives bitsandbytes' AdamW8bit (it runs on this CPU from
    bitsandbytes 0.50). Both moments of a 4096 x 64 weight take one byte per value plus an
    fp32 scale per block of 256: 2 * 262,144 + 2 * 1,024 * 4 (+ two 256-entry fp32 maps)
    bytes, against 2 * 262,144 * 4 for fp32 AdamW: 0.26 of it. After 50 steps towards a
    target both have moved the weights the same way, to within a few percent."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    init, target = torch.randn(4096, 64), torch.randn(4096, 64)
    w32 = torch.nn.Parameter(init.clone())
    ref = adamw([w32], lr=1e-2, kind="adamw")
    w8 = torch.nn.Parameter(init.clone())
    opt = adamw([w8], lr=1e-2, kind="adamw8bit")
    assert isinstance(opt, bnb.optim.AdamW8bit)
    for p, o in ((w32, ref), (w8, opt)):
        _train(p, o, 50, target)
    moved32, moved8 = (w32 - init).detach(), (w8 - init).detach()
    assert torch.nn.functional.cosine_similarity(moved32.flatten(), moved8.flatten(), dim=0) > 0.99
    assert abs(moved8.norm() / moved32.norm() - 1) < 0.05
    want = 2 * 4096 * 64 + 2 * 1024 * 4 + 2 * 256 * 4
    assert _state_bytes(opt) == want
    assert _state_bytes(ref) == 2 * 4096 * 64 * 4 + 4  # + AdamW's step count (fp32 scalar)


def test_8bit_adamw_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[bnb\]'"):
        adamw([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, kind="adamw8bit")
    with pytest.raises(ConfigError, match="adamw or adamw8bit"):
        adamw([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, kind="sgd")
