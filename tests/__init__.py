"""The test suite, by layer of the package.

numerics/, optim/, parallel/, tools/ and flax/ mirror aptsjax's subpackages and aptsjax/flax.py;
test_data.py is aptsjax/data.py and test_package.py the package as a whole; benchmarks/, examples/
and docs/ test those folders. Shared: conftest.py (4 host CPU devices, the x64 fixture),
problems.py (test problems, pytree helpers), oracles.py (numpy references), rounding.py (the float32
error model), helpers.py (subprocess launches, CSV and example-section readers).
"""
