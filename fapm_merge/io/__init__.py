"""Files: checkpoints, recipes, LoRA adapters, results lines, atomic output folders.

Nothing here merges; only :func:`fapm_merge.io.recipe.lint_recipe` imports mergekit
(its recipe model and the registered methods' parameter specs).
"""
