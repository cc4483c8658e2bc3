"""The paper experiments of strassenkit (not shipped with the package; see README.md in this folder).

Run them with ``python experiments/run.py NAME [options]`` (or ``strassenkit experiment NAME``). Every
experiment module has ``add_arguments(parser)`` and ``run(args)``; they share :mod:`.common` and their
own models (:mod:`.models`) and offline data loaders (:mod:`.data`), and use strassenkit only through its
public API (plus ``strassenkit._models``, the small ViT and digits loader shared with ``strassenkit demo``).
"""
