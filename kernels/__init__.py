"""Triton backend of mixops, installed as ``mixops.kernels``: one ``<family>.py`` per family.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors
(the test suite does this on machines without a GPU). Each kernel is registered as its op's
``triton`` backend in one place, ``mixops/ops/triton_backend.py``.
"""
