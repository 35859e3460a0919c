"""Compiler passes over the traced graph (see :mod:`lrexport.passes.base`)."""
