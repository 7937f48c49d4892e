"""``python -m benchmarks.communication``: APTS vs Adam/SGD all-reduces (``.communication``)."""
from benchmarks.communication import communication

communication.main()
