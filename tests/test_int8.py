"""Weight-only int8 (`--quantize int8`): per-row int8 weights multiplied by `torch._weight_int8pack_mm`."""

import pytest
import torch
import torch.nn.functional as F

from verse.cli import main
from verse.errors import VerseError
from verse.infer.generate import generate
from verse.infer.runtime import load_for_inference
from verse.model.linear import Linear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_x_times_the_dequantized_weight(dtype):
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=True, dtype=dtype)
    layer.weight.data[3] = 0  # an all-zero row must not divide by zero
    dense = layer.weight.detach().float().clone()
    layer.int8_()
    assert layer.weight.dtype == torch.int8 and layer.int8_scale.shape == (96,) and "int8" in repr(layer)
    scale = layer.int8_scale.float()
    # scale = row max / 127 (in the weight's dtype); round to nearest on that grid: within half a step, but for
    # the row's largest weights, which a scale rounded down to bf16 can push past 127 (clamped: within one step)
    torch.testing.assert_close(scale[[0, 1, 2, 4]], dense.abs().amax(1)[[0, 1, 2, 4]] / 127,
                               rtol=4e-3 if dtype == torch.bfloat16 else 1e-6, atol=0)
    error = (layer.weight.float() * scale[:, None] - dense).abs()
    inside = layer.weight.abs() < 127
    assert (error[inside] <= (scale[:, None] * 0.5 * (1 + 1e-5)).expand_as(error)[inside]).all()
    assert (error <= scale[:, None]).all() and (layer.weight[3] == 0).all()
    x = torch.randn(3, 5, 64, dtype=dtype)
    oracle = F.linear(x.float(), layer.weight.float() * scale[:, None], layer.bias.float())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x).float(), oracle, **tol)
    assert layer(x).dtype == dtype
    torch.testing.assert_close(layer.dequantized_weight(torch.float32), layer.weight.float() * scale[:, None])


def test_quantized_model_decodes_as_its_dequantized_weights(tiny_byte_checkpoint):
    """`load_for_inference(quantize="int8")`: every linear layer (the tied head too, the embedding not) holds int8;
    greedy decoding gives the tokens of the same model with the int8 weights widened back to float32."""
    model, tok = load_for_inference(str(tiny_byte_checkpoint), quantize="int8")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    assert model.embed.weight.dtype == torch.float32
    widened, _ = load_for_inference(str(tiny_byte_checkpoint))
    dense_head = widened.head.weight.detach().clone()
    for (name, q), w in zip(model.named_modules(), widened.modules()):
        if isinstance(q, Linear):
            w.weight = torch.nn.Parameter(q.dequantized_weight(torch.float32), requires_grad=False)
    assert widened.embed.weight.data_ptr() != widened.head.weight.data_ptr()
    prompts = [tok.encode("The cat"), tok.encode("Once upon a time, there")]
    kwargs = dict(max_new_tokens=12, stop_ids=set())
    assert generate(model, tok, prompts, **kwargs) == generate(widened, tok, prompts, **kwargs)
    ids = torch.tensor([prompts[1]])
    torch.testing.assert_close(model(ids), widened(ids), rtol=1e-4, atol=1e-4)
    # and close to the unquantized model: int8 moves the head's logits by a small fraction of their spread
    dense_logits = F.linear(widened.hidden_states(ids), dense_head)
    assert (model(ids) - dense_logits).abs().max() < 0.05 * dense_logits.std()


def test_quantize_on_the_command_line(tiny_byte_checkpoint, capsys):
    assert main(["generate", str(tiny_byte_checkpoint), "--prompt", "Hi", "--max-new-tokens", "3",
                 "--quantize", "int8"]) == 0
    with pytest.raises(VerseError, match="--quantize must be one of int8"):
        load_for_inference(str(tiny_byte_checkpoint), quantize="int4")


def test_bench_generate_has_int8_rows():
    from verse.bench.generate import parse_row

    assert parse_row("int8+compile", torch.bfloat16) == {"weights": "int8", "dtype": parse_row("auto", torch.bfloat16)
                                                         ["dtype"], "compile": True, "static": False}
    with pytest.raises(VerseError, match="int8"):
        parse_row("int4", torch.bfloat16)


def test_lora_layer_over_a_plain_and_an_int8_base():
    """A LoRA layer keeps its base's int8 weights (and works over a plain one): base x W^T + s B A x."""
    from verse.peft.lora import LoraArgs, LoraLinear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    for base in (Linear(16, 8), Linear(16, 8).int8_()):
        layer = LoraLinear(base, LoraArgs(rank=2))
        torch.nn.init.normal_(layer.lora_B)
        oracle = (F.linear(x, base.dequantized_weight(torch.float32))
                  + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling)
        torch.testing.assert_close(layer(x), oracle, rtol=1e-5, atol=1e-5)
