"""The ``strassenkit`` command line: one module per command, each with ``add_arguments(parser)`` and ``run(args)``.

``strassenkit.cli.COMMANDS`` maps every command name to its module here. The paper experiments are not
part of the package: ``strassenkit experiment NAME`` (:mod:`.experiment`) launches them from the
top-level ``experiments/`` folder of a source checkout.
"""
