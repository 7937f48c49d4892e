"""Tests of aptsjax.tools: the readers of compiled programs."""
