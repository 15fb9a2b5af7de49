"""Files: checkpoints, recipes, LoRA adapters, results lines, atomic output folders.

Recipes are read and interpreted by :mod:`~fapm_merge.io.recipe`; how mergekit will
read each model reference (folder or hub) is :mod:`~fapm_merge.io.model_paths`.
Nothing here merges; only :mod:`~fapm_merge.io.lint` imports mergekit (its recipe
model and the registered methods' parameter specs), when its functions are called.
"""
