"""eval: the personalization benchmark behind ``unipers eval``.

metrics (pure scoring functions), models (CLIP / DINO from local folders), targets (held-out data of a
prepared folder), prompts (fixed texts and the baselines' wording), scoring (answer logits, log-probs and
greedy answers on an InferenceSession), runner (concepts x methods -> results), report (JSON, Markdown,
grids, curves, compare), cli.
"""
