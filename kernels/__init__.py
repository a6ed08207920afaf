"""Triton backend of mixops, installed as ``mixops.kernels``: one ``<family>.py`` per family.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors
(the test suite does this on machines without a GPU). No family has a Triton kernel yet; the
issues that add them register each one with ``mixops.backend.register(op, "triton", ...)``.
"""
