"""aptsjax.tools.comm: every collective of a compiled program, its size, its trips and the mesh
axes it spans (``collective_stats``), and the all-reduces alone (``allreduce_stats``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from aptsjax.tools import comm


@pytest.fixture(scope="module")
def mesh():
  """A 2 x 2 (data, model) mesh whose devices are NOT in id order (0 2 / 1 3).

  Device ids and logical ids then differ: classifying by device id would call the data-axis
  groups {0, 2}, {1, 3} (logical) model-axis ones. The HLO names logical ids.
  """
  devices = np.asarray(jax.devices()[:4])[[0, 2, 1, 3]].reshape(2, 2)
  return jax.sharding.Mesh(devices, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def stats(fn, mesh, *args):
  return comm.collective_stats(jax.jit(fn).lower(*args).compile(), mesh)


def placed(mesh, shape, spec):
  return jax.device_put(jnp.ones(shape), NamedSharding(mesh, spec))


def test_psum_over_data_is_a_data_axis_all_reduce(mesh):
  f = jax.shard_map(lambda x: jax.lax.psum(x, "data"), mesh=mesh, in_specs=P("data"),
                    out_specs=P(), axis_names={"data"})
  (r,) = stats(f, mesh, placed(mesh, (4, 8), P("data")))
  assert (r.kind, r.elements, r.dtypes, r.axes, r.group_size) == (
      "all-reduce", 16, ("f32",), ("data",), 2)
  assert r.trips == 1 and not r.in_loop and "psum" in r.op_name


def test_sharded_dot_reduces_over_the_model_axis(mesh):
  a, b = placed(mesh, (8, 16), P(None, "model")), placed(mesh, (16, 4), P("model", None))
  g = jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P()))
  (r,) = comm.collective_stats(g.lower(a, b).compile(), mesh)
  assert (r.kind, r.elements, r.axes) == ("all-reduce", 32, ("model",))


def test_replicating_a_sharded_array_all_gathers_over_the_model_axis(mesh):
  g = jax.jit(lambda a: 2 * a, out_shardings=NamedSharding(mesh, P()))
  records = comm.collective_stats(g.lower(placed(mesh, (8, 16), P(None, "model"))).compile(), mesh)
  assert [(r.kind, r.elements, r.axes) for r in records] == [("all-gather", 128, ("model",))]


def test_data_manual_program_with_an_automatic_model_axis(mesh):
  """Inside a shard_map manual over "data" the model's all-reduce stays on "model"."""
  f = jax.shard_map(lambda a, b: jax.lax.psum(a @ b, "data"), mesh=mesh, in_specs=(P(), P()),
                    out_specs=P(), axis_names={"data"})
  records = stats(f, mesh, placed(mesh, (8, 16), P(None, "model")),
                  placed(mesh, (16, 4), P("model", None)))
  assert sorted((r.kind, r.elements, r.axes) for r in records) == [
      ("all-reduce", 32, ("data",)), ("all-reduce", 32, ("model",))]


def test_permute_reduce_scatter_and_loop_trips(mesh):
  x = placed(mesh, (4, 8), P("data"))
  perm = jax.shard_map(lambda v: jax.lax.ppermute(v, "data", [(0, 1), (1, 0)]), mesh=mesh,
                       in_specs=P("data"), out_specs=P("data"), axis_names={"data"})
  (r,) = stats(perm, mesh, x)
  assert (r.kind, r.elements, r.axes, r.group_size) == ("collective-permute", 16, ("data",), 2)
  scatter = jax.shard_map(
      lambda v: jax.lax.psum_scatter(v, "model", scatter_dimension=1, tiled=True), mesh=mesh,
      in_specs=P(None), out_specs=P(None, "model"), axis_names={"model"})
  records = stats(scatter, mesh, placed(mesh, (4, 8), P()))
  assert [(r.kind, r.elements, r.axes) for r in records] == [("reduce-scatter", 16, ("model",))]
  loop = jax.shard_map(
      lambda v: jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.psum(c, "data") * 0.5, v),
      mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}, check_vma=False)
  (r,) = stats(loop, mesh, x)
  assert (r.axes, r.trips, r.in_loop) == (("data",), 3, True)
  # allreduce_stats (shared loop logic) agrees.
  (a,) = comm.allreduce_stats(jax.jit(loop).lower(x).compile())
  assert (a.elements, a.trips, a.in_loop) == (16, 3, True)


HLO = """HloModule m, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[6])) -> (s32[], f32[6]) {
  %p = (s32[], f32[6]) parameter(0)
  %v = f32[6]{0} get-tuple-element(%p), index=1
  %ar = f32[6]{0} all-reduce-start(%v), channel_id=3, replica_groups=[2,2]<=[2,2]T(1,0), use_global_device_ids=true, to_apply=%add
  %d = f32[6]{0} all-reduce-done(%ar)
  ROOT %t = (s32[], f32[6]) tuple(%i, %d)
}

%cond (p: (s32[], f32[6])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[6]) -> f32[6] {
  %x = f32[6]{0} parameter(0)
  %e = f32[6]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1},{2,3}}, use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(f)/psum"}
  %g = (f32[3]{0}, f32[12]{0}) all-gather-start(%x), channel_id=2, replica_groups=[2,2]<=[4], dimensions={0}, use_global_device_ids=true
  %gd = f32[12]{0} all-gather-done(%g)
  %cp = (f32[6]{0}, f32[6]{0}, u32[], u32[]) collective-permute-start(%x), channel_id=4, source_target_pairs={{0,0},{1,1},{2,2},{3,3}}
  %cpd = f32[6]{0} collective-permute-done(%cp)
  %m = f32[5]{0} all-reduce(%x), channel_id=5, replica_groups=mesh['a'=1,'b'=2,'c'=2], device_ids=([2,2]T(1,0)) {'b'}, use_global_device_ids=true, to_apply=%add
  %z = (f32[2]{0}, f32[2]{0}) all-to-all(%x, %x), channel_id=6, replica_groups={}
  %w = (s32[], f32[6]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %r = f32[6]{0} add(%e, %gd)
}
"""


def test_literal_hlo_formats():
  """Explicit, iota and mesh-axes groups; -start forms; empty groups; loop trips."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  got = [(r.kind, r.elements, r.axes, r.group_size, r.trips, r.in_loop)
         for r in comm.collective_stats(HLO, mesh)]
  assert sorted(got) == sorted([
      ("all-reduce", 6, ("model",), 2, 1, False),            # {{0,1},{2,3}}
      ("all-gather", 12, ("model",), 2, 1, False),           # [2,2]<=[4]: {0,1},{2,3}
      ("collective-permute", 6, (), 1, 1, False),            # self-pairs only
      ("all-reduce", 5, ("model",), 2, 1, False),            # mesh axes: {0,1},{2,3}
      ("all-to-all", 4, ("data", "model"), 4, 1, False),     # {}: every device
      ("all-reduce", 6, ("data",), 2, 7, True),              # [2,2]<=[2,2]T(1,0): {0,2},{1,3}
  ])
  shapes = {r.kind: r.shapes for r in comm.collective_stats(HLO, mesh)}
  assert shapes["all-to-all"] == ((2,), (2,)) and shapes["all-gather"] == ((12,),)
  assert shapes["collective-permute"] == ((6,),)
  assert [r.op_name for r in comm.collective_stats(HLO) if r.op_name] == ["jit(f)/psum"]
  assert all(r.axes is None for r in comm.collective_stats(HLO))
  assert [r.elements for r in comm.allreduce_stats(HLO)] == [6, 6, 5]


def test_allreduce_detector_flags_loops():
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))

  def f(x):
    def body(c):
      i, v = c
      return i + 1, jax.lax.psum(v, "data") * 0.5
    return jax.lax.while_loop(lambda c: c[0] < x[0, 0].astype(int), body, (0, x))[1]

  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                            check_vma=False))
  records = comm.allreduce_stats(g.lower(jnp.ones((4, 3))).compile())
  assert records and all(r.in_loop and r.trips is None for r in records)
