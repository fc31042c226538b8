"""The benchmarks and kernel tooling of eco, installed as ``eco_bench`` (not part of the runtime package ``eco``).

Each module is also a script: ``python bench/<name>.py --help``. ``memory_loss``
is the ``eco-bench`` command; ``aot`` compiles the kernels for GPU targets
without a GPU and reads ptxas/SASS (``kernel_report``, ``kernel_tricks`` and
``tests/test_aot_compile.py`` use it).
"""

#: the formats the speed and launch benchmarks measure (names of ``eco.formats.format_from_tag``)
FORMAT_TAGS = ("fp8-row", "fp8-block128", "int4-tensor", "int4-group32")
