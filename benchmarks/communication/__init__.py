"""Communication read off compiled programs: devices (``python -m benchmarks.communication``),
processes (``benchmarks.communication.hosts``) and data x model meshes
(``benchmarks.communication.mesh``)."""
