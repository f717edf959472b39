"""Module-swapped SNNs (models fx cannot trace) fold the steps into dim 0 of the model's own
activations: layouts and reductions that would mix the steps are clear errors at conversion (they
were silently wrong, or a reshape error at run time), and compensated ops pass tensors without a
batch through (a LayerNorm of a position embedding was differenced across its rows as if they
were steps). The step-by-step simulation is the reference."""
import pytest
import torch
from torch import nn

import hmtconv
from step_reference import run_steps


class Swapped(nn.Module):
    """Untraceable (a branch on a value); ``layout``: "tokens_first" (the ReLU and the LayerNorm see
    ``[N, B, C]``), "batch_mean" (each sample minus the batch mean), "shared_norm" (one LayerNorm
    for the activations and for a position embedding), "own_norm" (a LayerNorm of its own for it)."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout
        self.fc1, self.act, self.norm, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3)
        self.pos, self.pos_norm = nn.Parameter(torch.randn(5, 8)), nn.LayerNorm(8)

    def forward(self, x):  # [B, 5 tokens, 6]
        h = self.fc1(x)
        if h.max() > -1e9:  # data-dependent control flow: fx cannot trace it
            h = h.transpose(0, 1) if self.layout == "tokens_first" else h
        h = self.norm(self.act(h))
        if self.layout == "batch_mean":
            h = h - h.mean(0, keepdim=True)
        if self.layout in ("shared_norm", "own_norm"):
            h = h + (self.norm if self.layout == "shared_norm" else self.pos_norm)(self.pos)
        return self.fc2(h).mean(0 if self.layout == "tokens_first" else 1)


def calibration(batches=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(batches)]


@pytest.mark.parametrize("layout,match", [
    ("tokens_first", r"act \(SpikingActivation, call 1\): its inputs' shapes \[torch.Size\(\[5, 3, 8\]\)\]"),
    ("batch_mean", "a sample's output depends on the other samples of its batch"),
    ("shared_norm", r"norm \(LayerNorm\): it is called both on activations and on tensors without a batch dim")])
@pytest.mark.parametrize("T", [3, 5])  # (T = 5 = tokens: the tokens-first layout unfolded without a reshape error)
def test_layouts_that_mix_the_steps_are_clear_errors(layout, match, T):
    torch.manual_seed(0)
    model = Swapped(layout).double().eval()
    with pytest.raises(ValueError, match=match):
        hmtconv.convert(model, calibration(), n=4, T=T, policy="999")


def test_a_compensated_op_of_the_weights_alone_runs_once_and_equals_the_step_by_step_simulation():
    torch.manual_seed(0)
    model = Swapped("own_norm").double().eval()
    snn = hmtconv.convert(model, calibration(), n=4, T=5, policy="999")
    x = calibration(1)[0][0][:3]
    ref, _, _ = run_steps(snn, x, 5)
    assert (snn(x) - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert not snn.report.traced and type(snn.net.pos_norm) is nn.LayerNorm  # plain: its input has no batch
