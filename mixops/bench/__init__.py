"""The ``mixops-bench`` command: real model shapes, every backend, one table.

``presets`` builds the cases (modules and inputs at the stage shapes of the model configs in
docs/), ``timing`` measures them, ``ceilings`` measures what the machine can do at best,
``report`` prints and writes the results, ``cli`` ties them together.
"""
