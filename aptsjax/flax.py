"""Adapters between Flax (NNX and Linen) training loops and the aptsjax optimizers.

The trust-region transformations evaluate the loss themselves (at the trial point, for the
ratio test), so they need ``loss_fn(params, batch) -> scalar``, a deterministic function of
the parameters alone. Two small helpers connect that signature to Flax:

* NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, **kwargs)`` forwards
  ``kwargs`` to ``tx.update`` and passes as ``params`` the pure ``nnx.State`` of the model's
  ``nnx.Param`` variables (``nnx.as_pure(nnx.state(model, nnx.Param))``). ``nnx_loss_fn`` turns
  ``loss(model, batch)`` into a ``loss_fn`` that takes exactly that state::

    tx = aptsjax.trust_region(aptsjax.flax.nnx_loss_fn(model, loss))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, grads, batch=batch)

* Linen: ``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)`` treats
  ``kwargs`` as dataclass fields to replace and never forwards them to ``tx.update``;
  ``apply_train_state(state, grads, batch=batch)`` is the drop-in replacement that does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from flax.training import train_state as train_state_lib

PyTree = Any
ModelLoss = Callable[[Any, Any], jax.Array]
LossFn = Callable[[PyTree, Any], jax.Array]

_OUT_OF_SCOPE = (
    "the trust-region ratio test compares loss_fn at the current and at the trial parameters, "
    "so loss_fn must be a deterministic function of the nnx.Param variables and the batch "
    "alone. Models with mutable non-parameter state (BatchNorm batch statistics, dropout RNG "
    "streams / nnx.Rngs, caches or any other non-Param nnx.Variable the forward pass may "
    "update) are not supported: that state would be silently frozen at its construction-time "
    "value. Remove those layers (or build Dropout with rate=0), or keep read-only constants as "
    "plain arrays (nnx.data) rather than nnx.Variable.")


def _path_name(path: tuple[Any, ...]) -> str:
  """Dotted name of a graph path, e.g. ``('block', 0, 'kernel')`` -> ``'block.0.kernel'``."""
  return ".".join(str(part) for part in path) or "<model>"


def non_param_variables(rest: nnx.State) -> list[str]:
  """Names the ``nnx.Variable`` leaves of a state (those that are not plain arrays).

  Args:
    rest: the non-``nnx.Param`` part of a model's state (the ``...`` part of ``nnx.split``).

  Returns:
    ``'path (VariableType)'`` for every Variable in ``rest``, in path order.
  """
  return [f"{_path_name(path)} ({type(value).__name__})"
          for path, value in nnx.to_flat_state(rest) if isinstance(value, nnx.Variable)]


def stochastic_modules(model: nnx.Module) -> list[str]:
  """Names the ``nnx.Dropout`` submodules of ``model`` with a positive rate.

  Their ``deterministic`` flag can be overridden at call time, so any of them makes the loss
  potentially random, with or without an RNG stream stored in the model.

  Args:
    model: a Flax NNX module.

  Returns:
    ``'path (Dropout)'`` for every such submodule.
  """
  return [f"{_path_name(path)} ({type(node).__name__})"
          for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Dropout) and node.rate > 0]


def check_stateless(model: nnx.Module, rest: nnx.State) -> None:
  """Raises ValueError if ``model`` has mutable non-parameter state or dropout.

  Args:
    model: the Flax NNX module.
    rest: its non-``nnx.Param`` state (from ``nnx.split(model, nnx.Param, ...)``).
  """
  found = non_param_variables(rest) + stochastic_modules(model)
  if found:
    raise ValueError(f"nnx_loss_fn: the model has non-parameter state or dropout: "
                     f"{', '.join(found)}. Not supported because {_OUT_OF_SCOPE}")


def nnx_loss_fn(model: nnx.Module, loss: ModelLoss) -> LossFn:
  """Turns ``loss(model, batch)`` into ``loss_fn(params, batch)`` for the aptsjax optimizers.

  ``params`` is the ``nnx.State`` of the model's ``nnx.Param`` variables: what
  ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, batch=batch)`` passes to
  ``tx.update`` (pure arrays), or ``nnx.state(model, nnx.Param)`` (Variables); both work. The
  model's graph definition and non-parameter data are captured once, here; build a new
  ``loss_fn`` if the model's structure or static attributes change afterwards. ``model`` itself
  is never modified by ``loss_fn``.

  Args:
    model: a Flax NNX module whose only ``nnx.Variable`` leaves are ``nnx.Param`` (plain array
      constants are allowed).
    loss: ``loss(model, batch) -> scalar``, e.g. the mean cross-entropy of ``model(x)``.

  Returns:
    ``loss_fn(params, batch) -> scalar``.

  Raises:
    ValueError: if the model holds non-``Param`` Variables (BatchNorm statistics, RNG streams
      from ``nnx.Rngs``, caches, ...) or an ``nnx.Dropout`` with a positive rate: the
      trust-region ratio test needs a deterministic loss of the parameters alone.
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  check_stateless(model, rest)

  def loss_fn(params: nnx.State, batch: Any = None) -> jax.Array:
    return loss(nnx.merge(graphdef, params, rest), batch)

  return loss_fn


def apply_train_state(train_state: train_state_lib.TrainState, grads: PyTree,
                      **extra_args: Any) -> train_state_lib.TrainState:
  """``TrainState.apply_gradients`` that forwards keyword arguments to ``tx.update``.

  Flax's ``apply_gradients(grads=..., **kwargs)`` uses ``kwargs`` as fields to replace, so an
  ``optax.GradientTransformationExtraArgs`` such as ``aptsjax.trust_region`` never sees its
  ``batch``. This helper calls
  ``train_state.tx.update(grads, train_state.opt_state, train_state.params, **extra_args)``,
  applies the updates and increments ``step``. Jittable.

  Args:
    train_state: a ``flax.training.train_state.TrainState`` (or a subclass).
    grads: the gradient of the loss at ``train_state.params`` (same pytree structure).
    **extra_args: forwarded to ``tx.update``, e.g. ``batch=batch`` and optionally
      ``value=loss``.

  Returns:
    The new TrainState: updated ``params`` and ``opt_state``, ``step + 1``.

  Raises:
    ValueError: if ``params`` uses Flax's ``overwrite_with_gradient`` collection (not supported:
      the trust-region loss needs the whole parameter pytree).
  """
  if isinstance(train_state.params, Mapping) and (
      train_state_lib.OVERWRITE_WITH_GRADIENT in train_state.params):
    raise ValueError("apply_train_state does not support the "
                     f"'{train_state_lib.OVERWRITE_WITH_GRADIENT}' parameter collection.")
  updates, opt_state = train_state.tx.update(grads, train_state.opt_state, train_state.params,
                                             **extra_args)
  params = optax.apply_updates(train_state.params, updates)
  return train_state.replace(step=train_state.step + 1, params=params, opt_state=opt_state)


def leading_metadata(state: PyTree) -> PyTree:
  """Extends Flax NNX partitioning metadata to the leading axes the optimizer state adds.

  ``nnx.Optimizer`` passes ``nnx.Variable`` parameters to ``init``; mapping over them keeps each
  Variable's ``out_sharding`` metadata, which then names the parameter's dimensions for an array
  with extra leading axes (an L-SR1 stack, the per-subdomain states). This prefixes None for
  each extra axis, so ``nnx.get_partition_spec`` of the optimizer state shards every stack as
  its parameter. Leaves without such metadata are returned unchanged.

  Args:
    state: an optimizer state, possibly holding Variables.

  Returns:
    The state with consistent metadata.
  """
  def fix(x):
    if not isinstance(x, nnx.Variable):
      return x
    names = x.get_metadata().get("out_sharding")
    extra = np.ndim(x.get_value()) - len(names or ())
    if not names or extra <= 0:
      return x
    return x.replace(out_sharding=(None,) * extra + tuple(names))

  return jax.tree.map(fix, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def partitioned(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``init`` extends the parameters' NNX partitioning metadata to its state.

  For ``nnx.Optimizer`` with partitioned parameters (``nnx.with_partitioning``) on a mesh:
  every state leaf shaped like a parameter with extra leading axes (an L-SR1 stack, the APTS
  per-subdomain states) then carries ``(None, ..., *param_axes)``, so
  ``nnx.get_named_sharding(nnx.state(optimizer), mesh)`` shards it like its parameter::

    optimizer = nnx.Optimizer(model, aptsjax.flax.partitioned(tx), wrt=nnx.Param)

  Without it the stacks keep the parameter's own metadata, which names the wrong dimensions.

  Args:
    tx: an aptsjax (or any optax) transformation.

  Returns:
    The same transformation with the metadata fixed at ``init``.
  """
  def init_fn(params: PyTree) -> Any:
    return leading_metadata(tx.init(params))

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)
