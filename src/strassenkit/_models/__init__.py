"""Private reference models and data for the package's own commands and tests (not a public API).

- :mod:`.vit`: the small ViT whose linear layers come from a factory (``strassenkit demo``, ``train --task digits``);
- :mod:`.digits`: scikit-learn's bundled 8x8 digits, split once (no download);
- :mod:`.synthetic`: the offline synthetic tasks of ``strassenkit train`` (token MLP, bigram LM and their data);
- :mod:`.training`: the plain train / accuracy / timing loop of the demo (the experiments reuse it).

The paper experiments (top-level ``experiments/`` folder, not shipped) keep their own models and loaders
and may import this package; nothing else outside strassenkit should.
"""
