"""Evaluation: LAMBADA/PIQA offline with lm-evaluation-harness's semantics, and neoxq as an
lm-eval model.

- :mod:`evals.data` reads the local files (errors name file and line);
- :mod:`evals.tasks` builds requests and aggregates metrics exactly as lm-eval 0.4;
- :mod:`evals.scoring` tokenizes/truncates as lm-eval's ``hf`` model and scores on the engine;
- :mod:`evals.runner` runs local tasks without lm-eval (what ``neoxq evaluate`` uses);
- :mod:`evals.harness` (needs lm-eval) is the ``neoxq`` lm-eval model and lm-eval task
  objects over the local files; ``python -m evals`` is lm-eval's CLI with it registered.
"""
