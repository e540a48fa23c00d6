import pytest
from hypothesis import settings

# Property tests: the same examples on every run and machine, no example database written to disk.
settings.register_profile("sparsecirc", derandomize=True, database=None, deadline=None, max_examples=100)
settings.load_profile("sparsecirc")

from sparsecirc.data import AdditionTask, make_split
from sparsecirc.model import ModelConfig
from sparsecirc.sparse_attention import gate_bias_of, set_gate_bias

# A tiny task and model so that unit tests take seconds: 1-digit operands, 2 answer slots.
TINY = ModelConfig(operand_digits=1, answer_digits=2, n_layers=2, n_heads=2, d_head=8, d_model=16, d_mlp=32, seed=0)


def _temporary_hook_count(model) -> int:
    """Hooks attached to ``model``'s hook points other than permanent ones (a model's own
    gating hooks are permanent): 0 when no ``with`` block has left anything behind."""
    points = {id(point): point for point in model.hook_dict.values()}.values()  # hook_dict also holds aliases
    return sum(sum(not handle.is_permanent for handle in point.fwd_hooks + point.bwd_hooks) for point in points)


@pytest.fixture
def temporary_hook_count():
    return _temporary_hook_count


@pytest.fixture
def tiny_config():
    return TINY


def _tiny_split():
    return make_split(AdditionTask(1, 2), test_size=20, seed=0)


@pytest.fixture
def tiny_split():
    return _tiny_split()


@pytest.fixture(scope="session")
def tiny_trained_state():
    """The tiny model trained for 300 steps on ``tiny_split``, as a state dict: the base model of
    many sparsify tests, trained once per test process (each test builds its own model from it)."""
    import copy

    from sparsecirc.model import build_model
    from sparsecirc.training import TrainConfig, train

    model = build_model(TINY)
    train(model, _tiny_split(), TrainConfig(lr=3e-3, batch_size=64, max_steps=300, eval_every=100), progress=False)
    return copy.deepcopy(model.state_dict())


def bridge_twin(model):
    """A TransformerLens ``TransformerBridge`` (``boot_native``) with ``model``'s weights and gate
    bias: gated through hooks, it must compute what the GatedTransformer computes."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_native(model.cfg)
    bridge.load_state_dict(model.state_dict())
    set_gate_bias(bridge, gate_bias_of(model))
    bridge.train(model.training)
    return bridge
