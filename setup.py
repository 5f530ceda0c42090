"""Builds the optional C++ extension. Nothing here imports torch."""

from setuptools import setup

setup()
