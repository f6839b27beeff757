"""model/dropout.py: LoRA's CPU dropout is a Bernoulli(p) mask scaled to keep the expectation, seeded like torch's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgpt.args import FinetuneArgs
from medgpt.model.dropout import CpuDropout, use_cpu_dropout
from medgpt.model.load import add_lora


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drops_p_of_the_elements_and_scales_the_rest(p):
    drop = CpuDropout(p).train()
    x = torch.full((1000, 1001), 2.0)  # an odd size: the last 64-bit draw is partly used
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1e-5
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 2.0 / (1 - p)), rtol=1e-4, atol=0)
    assert abs(y.mean().item() - 2.0) < 0.01  # the expectation is kept


def test_masks_differ_per_call_and_repeat_per_seed():
    drop = CpuDropout(0.3).train()
    x = torch.ones(64, 64)
    torch.manual_seed(1)
    a, b = drop(x), drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)
    # the four 16-bit lanes of a draw are independent: neighbours are not dropped together more than chance
    big = drop(torch.ones(400_000))
    pairs = ((big[0::2] == 0) & (big[1::2] == 0)).float().mean().item()
    assert abs(pairs - 0.09) < 0.005


def test_gradient_is_the_mask_times_the_scale_and_eval_is_identity():
    drop = CpuDropout(0.2).train()
    x = torch.randn(32, 48, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.8)
    assert torch.equal(drop.eval()(x), x)
    assert CpuDropout(0.2).train()(torch.zeros(0, 4)).shape == (0, 4)


def test_every_lora_dropout_is_replaced(tiny_llama):
    from transformers import AutoModelForCausalLM

    net = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), FinetuneArgs(type="lora", lora_dropout=0.1))
    drops = [m for name, m in net.named_modules() if "lora_dropout." in name]
    assert drops and all(type(m) is CpuDropout and m.p == 0.1 for m in drops)
    assert not any(type(m) is nn.Dropout and m.p > 0 for _, m in net.named_modules() if "lora_dropout" in _)
    assert use_cpu_dropout(net) == 0  # nothing left to change
    out = net(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_a_continued_adapter_gets_it_too(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from medgpt.args import ModelArgs
    from medgpt.model.load import load_model

    add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), FinetuneArgs(type="lora")).save_pretrained(tmp_path)
    net = load_model(ModelArgs(name_or_path=str(tiny_llama), adapter=str(tmp_path)), FinetuneArgs(type="lora"))
    assert any(type(m) is CpuDropout for m in net.modules())
