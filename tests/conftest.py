"""Shared pytest set-up: the repo root on sys.path so tests import the top-level scripts."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
