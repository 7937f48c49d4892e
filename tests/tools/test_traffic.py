"""aptsjax.tools.traffic: the parameter-stack traffic it reads off a compiled L-SR1 update."""
import jax
import pytest

from aptsjax.numerics import lsr1
from aptsjax.tools import traffic
from benchmarks.cost import core_cost


@pytest.mark.slow
def test_hlo_traffic_sees_the_copies_of_an_update_without_donation():
  """The donated update reads each stack twice; without donation XLA also copies both stacks
  before the insert: 2 copies, 2 more reads."""
  state, s_new, y_new, _, _ = core_cost.make_problem(300, 3, num=2)
  shape = state.s.shape
  text = lambda **kw: jax.jit(jax.vmap(lsr1.update), **kw).lower(state, s_new, y_new).compile(
      ).as_text()
  assert traffic.stack_traffic(text(donate_argnums=0), shape) == (4, 0, 2.0)
  assert traffic.stack_traffic(text(), shape) == (6, 2, 4.0)
