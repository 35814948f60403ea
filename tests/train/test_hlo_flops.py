"""hlo_flops adds back the matmuls of the loop trips XLA's cost analysis counts once: exact on
loops of plain matmuls (nested too); a loop without a known trip count stays counted once."""
import jax
import jax.numpy as jnp
import pytest

from vlmjax.train import hlo_flops

N = 64
MATMUL = 2 * N ** 3


def compiled_text_and_cost(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    return compiled.as_text(), (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("trips", [3, 5])
def test_a_fori_loop_of_matmuls_counts_every_trip(trips):
    def loop(x, w):
        return jax.lax.fori_loop(0, trips, lambda i, y: jnp.tanh(y @ w), x)

    x, w = jnp.ones((N, N)), jnp.ones((N, N))
    text, xla = compiled_text_and_cost(loop, x, w)
    assert xla < 1.5 * MATMUL  # XLA: the body once
    assert hlo_flops.loop_dot_flops_missed(text) == (trips - 1) * MATMUL


def test_nested_loops_and_batched_dots_multiply_their_trip_counts():
    def nested(x, w):
        inner = lambda i, y: jnp.einsum("bij,jk->bik", y, w) / N  # noqa: E731
        return jax.lax.fori_loop(0, 3, lambda i, y: jax.lax.fori_loop(0, 4, inner, y), x)

    x, w = jnp.ones((2, N, N)), jnp.ones((N, N))
    text, xla = compiled_text_and_cost(nested, x, w)
    per_dot = 2 * MATMUL  # the batch of 2
    assert hlo_flops.loop_dot_flops_missed(text) == (12 - 1) * per_dot
    assert xla + (12 - 1) * per_dot == pytest.approx(12 * per_dot, rel=0.05)


def test_a_loop_without_a_known_trip_count_is_counted_once():
    def until_large(x, w):
        return jax.lax.while_loop(lambda y: jnp.sum(y) < 1e6, lambda y: y @ w, x)

    text, _ = compiled_text_and_cost(until_large, jnp.ones((N, N)), jnp.ones((N, N)))
    assert '"known_trip_count"' not in text
    assert hlo_flops.loop_dot_flops_missed(text) == 0


def test_hlo_without_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_flops.loop_dot_flops_missed("HloModule empty\n")
