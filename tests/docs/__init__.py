"""Tests of docs/: the site builds (marked docs and slow) and its references hold."""
