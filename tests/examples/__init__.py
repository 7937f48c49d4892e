"""Tests of examples/: the scripts, and the snippets of them that README.md and docs/ show."""

# Every example script and the sections the README and the docs may include from it.
EXAMPLES = {
    "trust_region_full_batch.py": ["step"],
    "sapts_minibatch.py": ["trainer"],
    "options.py": ["options"],
    "shard_map.py": ["shard_map"],
    "pmap.py": ["pmap"],
    "flax_nnx.py": ["nnx"],
    "flax_linen.py": ["linen"],
    "multiprocess.py": ["multiprocess"],
    "checkpoint_resume.py": ["checkpoint"],
    "model_parallel.py": ["mesh"],
}
SHARED = ("circle.py", "cpu_devices.py")  # modules the scripts import, not scripts themselves
