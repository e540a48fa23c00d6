import pytest

from sparsecirc.data import AdditionTask, make_split
from sparsecirc.model import ModelConfig

# A tiny task and model so that unit tests take seconds: 1-digit operands, 2 answer slots.
TINY = ModelConfig(operand_digits=1, answer_digits=2, n_layers=2, n_heads=2, d_head=8, d_model=16, d_mlp=32, seed=0)


@pytest.fixture
def tiny_config():
    return TINY


@pytest.fixture
def tiny_split():
    return make_split(AdditionTask(1, 2), test_size=20, seed=0)
