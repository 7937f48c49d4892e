"""The benchmarks of aptsjax, by group (benchmarks/README.md lists every command).

* ``paper``: the paper's experiments on MNIST-5k (the main job), and the side-by-side run with
  the authors' PyTorch code;
* ``options``: the study of the APTS options that chose the library's defaults;
* ``communication``: bytes all-reduced per iteration, across devices, processes and meshes;
* ``cost``: the cost of the L-SR1 update and the OBS solve, and a profile of one APTS iteration;
* ``classic``: the trust-region method on classic unconstrained problems against scipy and optax;
* ``common``: data sets, models, test problems, and the output and progress helpers they share.
"""
