"""Every public name of the flat layout (main 59704ee) still resolves, or the changelog says
where it went.

The lists below were read off that commit: the names ``aptsjax/__init__.py`` exported and the
module-level public definitions of each module. A user's ``aptsjax.<module>.<name>`` keeps
working through the top-level attributes (``aptsjax.lsr1`` is ``aptsjax.numerics.lsr1``, ...;
``aptsjax.apts`` and ``aptsjax.trust_region`` are the functions, so their modules' other names
are looked up in ``aptsjax.optim``). A name that no longer resolves must have a migration line
in the "Migration" section of docs/changelog.md naming it as ``aptsjax.<module>.<name>`` (or
``aptsjax.<name>``).
"""
import importlib
import pathlib
import re

import pytest

import aptsjax

CHANGELOG = pathlib.Path(__file__).resolve().parents[1] / "docs" / "changelog.md"

TOP_LEVEL = (
    "blocks checkpoint comm data distributed hyperparams local lsr1 mesh APTSState apts "
    "layer_blocks leaf_blocks shard_blocks LocalCarry LocalSolver optax_local_solver "
    "trust_region_local_solver obs parallel scaling sharding state_specs GENERAL_MIN_RADIUS "
    "Hyperparams TrustRegionState trust_region value_and_grad_from_state compact flax_utils "
    "launch").split()

MODULES = {
    "apts": "APTSState to_varying local_objective apts",
    "blocks": "NAMED REPLICATED BOUNDS BlockLabels leaf_blocks layer_blocks shard_blocks "
              "check_name resolve mask count share divisors problems",
    "checkpoint": "save latest_step restore",
    "comm": "COLLECTIVES AllReduce allreduce_stats Collective collective_stats",
    "compact": "NOISE mm eps_of r_tol rank_tol eig_basis pair_gram pair_dots pair_combine "
               "Factor factor Spectral spectral unit_entries add_unit",
    "data": "layout_sizes REMAINDER_ACTIONS dropped_rows full_batch_sizes check_remainder "
            "overlap_layout take_rows overlapping_subdomains check_batch split_subdomains "
            "trim_rows num_minibatches minibatches iterate_minibatches",
    "distributed": "ENV_COORDINATOR ENV_NUM_PROCESSES ENV_PROCESS_ID ENV_LOCAL_DEVICE_IDS "
                   "DEFAULT_TIMEOUT wait_for_coordinator launched initialize is_main_process "
                   "check_same",
    "flax_utils": "non_param_variables stochastic_modules check_stateless nnx_loss_fn "
                  "apply_train_state",
    "hyperparams": "GENERAL_MIN_RADIUS CHOICES BOUNDARY_FRACTION Hyperparams make_hyperparams "
                   "ratio_test update_radius reaches_boundary",
    "launch": "free_port process_env launch main",
    "local": "LOCAL_STOP LocalCarry LocalSolver keep_inactive distance "
             "trust_region_local_solver optax_local_solver LocalOutcome run",
    "lsr1": "LSR1State memory_size init time_symmetric choose_gamma matvec update rescale "
            "dense_pairs spectral pair_dots pair_combine",
    "mesh": "default_num_devices mesh_devices build_mesh",
    "obs": "OBSResult check_radius first_order_step solve",
    "parallel": "pmap_state unpmap_state Trainer METRICS CPU_COMPILER_OPTIONS apts_trainer "
                "numpy_tree",
    "scaling": "ScaleState init update Coordinates coordinates ratio",
    "sharding": "full_spec pure param_specs check_specs state_specs shardings leading_metadata",
    "trust_region": "model_step Iterate Trial commit iterate TrustRegionState scalar_loss "
                    "TRUST_REGION_GROWTH trust_region value_and_grad_from_state",
}

# The modules whose top-level name is now a function: their other names live in aptsjax.optim.
FUNCTION_NAMES = {"apts": "aptsjax.optim.apts", "trust_region": "aptsjax.optim.trust_region"}


def migration_notes() -> str:
  """The text of the changelog's "Migration" section (from its heading to the next release)."""
  lines = CHANGELOG.read_text().splitlines()
  start = next((i for i, line in enumerate(lines)
                if line.startswith("#") and "Migration" in line), None)
  assert start is not None, "docs/changelog.md has no Migration section"
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
  return "\n".join(lines[start:end])


def _migrated(text: str) -> bool:
  """Whether a code span of the migration notes names ``text``'s last component as a word."""
  name = re.escape(text.rsplit(".", 1)[-1])
  return re.search(rf"`[^`]*\b{name}\b[^`]*`", migration_notes()) is not None


def _module(name: str):
  if name in FUNCTION_NAMES:
    return importlib.import_module(FUNCTION_NAMES[name])
  return getattr(aptsjax, name)


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_names(name):
  assert hasattr(aptsjax, name) or _migrated(f"aptsjax.{name}"), (
      f"aptsjax.{name} no longer resolves and docs/changelog.md has no `aptsjax.{name}` line")


@pytest.mark.parametrize("module,name", [(m, n) for m, names in MODULES.items()
                                         for n in names.split()])
def test_module_names(module, name):
  assert hasattr(_module(module), name) or _migrated(f"aptsjax.{module}.{name}"), (
      f"aptsjax.{module}.{name} no longer resolves and docs/changelog.md has no "
      f"`aptsjax.{module}.{name}` line")
