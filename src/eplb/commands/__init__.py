"""Sub-commands of the ``eplb`` command line, one module each (see :mod:`eplb.cli`)."""
