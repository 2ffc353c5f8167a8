"""The LRA encoder's start and its two poolings (sat/models/lra.py)."""

import pytest
import torch

from sat.config import ConfigError, load_config
from sat.data.batch import Batch
from sat.models.build import build_model


def _model(pooling: str, n: int = 64):
    cfg = load_config("lra-listops", overrides={"dataset": {"max_seq_len": n}, "model": {"pooling": pooling},
                                                "sparsity": {"block_size": 16, "density": 0.25}})
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=20, backend="torch").eval()


def _batch(lengths, n: int = 64, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = torch.arange(n) < lengths[:, None]
    x = torch.randint(1, 20, (len(lengths), n), generator=g) * mask
    return Batch(x, mask, torch.zeros(len(lengths), dtype=torch.long))


def test_token_and_position_embeddings_start_on_one_scale():
    """SAT's LRA model draws both from N(0, 0.02). PyTorch's default N(0, 1) for the tokens left the positions
    50x smaller."""
    model = _model("mean")
    assert abs(model.embed.weight.std().item() - 0.02) < 0.004
    assert abs(model.pos.std().item() - 0.02) < 0.002


def test_class_token_reads_position_zero_and_sees_the_input_shifted_by_one():
    model = _model("cls")
    batch = _batch([40, 63, 5])
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], mask=args[1]))
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (3, 10)
    expected_mask = torch.cat([torch.ones(3, 1, dtype=torch.bool), batch.mask[:, :-1]], dim=1)
    assert torch.equal(seen["mask"], expected_mask)  # the class token is a real key; lengths grow by one
    # position 0 holds the class vector (zeros at the start) plus position 0's embedding, for every example
    torch.testing.assert_close(seen["x"][:, 0], model.pos[0, 0].expand(3, -1))
    torch.testing.assert_close(seen["x"][:, 1], model.embed(batch.x[:, 0]) + model.pos[0, 1])


def test_class_token_output_ignores_padding_content():
    model = _model("cls")
    a = _batch([30, 50])
    b = Batch(a.x + (~a.mask) * 7, a.mask, a.y)  # different ids in the padded positions only
    with torch.no_grad():
        torch.testing.assert_close(model(a), model(b))


def test_class_token_refuses_a_sequence_that_fills_every_position():
    model = _model("cls")
    with pytest.raises(ValueError, match="at most 63 tokens"):
        model(_batch([64, 10]))


def test_pooling_values_are_checked():
    with pytest.raises(ConfigError, match="pooling"):
        load_config("lra-listops", overrides={"model": {"pooling": "max"}})
