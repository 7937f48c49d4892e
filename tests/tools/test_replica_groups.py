"""aptsjax.tools.replica_groups: the device groups of a collective in the HLO text's forms, and
the mesh axes a group spans."""
import pytest

from aptsjax.tools import replica_groups


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,2},{1,3}}, x", [[0, 2], [1, 3]]),
    ("replica_groups=[2,2]<=[4], x", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0), x", [[0, 2], [1, 3]]),
    ("replica_groups=[1,4]<=[4], x", [[0, 1, 2, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2] {'x'}, u", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2], device_ids=(0,2,1,3) {'y'}, u", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=4] {'x':(1)2}, u", [[0, 1], [2, 3]]),
    ("replica_groups=mesh['x'=4] {'x':(2)2}, u", [[0, 2], [1, 3]]),
    ("source_target_pairs={{0,1},{1,0}}, x", [[0, 1], [1, 0]]),
])
def test_replica_group_parsing(text, groups):
  assert sorted(replica_groups.replica_groups(text, 4)) == sorted(groups)


def test_spanned_axes_and_errors():
  shape, names = (2, 2), ("data", "model")
  assert replica_groups.spanned_axes([[0, 2], [1, 3]], shape, names) == ("data",)
  assert replica_groups.spanned_axes([[0, 1], [2, 3]], shape, names) == ("model",)
  assert replica_groups.spanned_axes([[0, 3]], shape, names) == ("data", "model")
  with pytest.raises(ValueError, match="outside a mesh of 4"):
    replica_groups.spanned_axes([[0, 5]], shape, names)
  with pytest.raises(ValueError, match="unknown replica_groups"):
    replica_groups.replica_groups("replica_groups=??", 4)
