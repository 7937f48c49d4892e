"""Tests of aptsjax.numerics: L-SR1, OBS, the compact form, the RMS scaling."""
