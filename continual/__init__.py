"""Continual learning on the core's model, heads, weightings and training loop.

- ``scenarios``: streams of experiences (split / permuted / rotated) in the Task-, Class-
  and Domain-incremental settings;
- ``learner``: the ``MultiTaskModel`` a run trains and how each setting reads its heads;
- ``strategies``: fine-tune, joint, regularisation (L2, EWC, online EWC, SI),
  distillation (LwF), replay (ER, A-GEM, GEM, DER, DER++), by name;
- ``buffer`` (replay memory, herding), ``fisher`` (per-sample empirical Fisher),
  ``projection`` (A-GEM / GEM as weightings), ``metrics`` (accuracy matrix, ACC, BWT,
  FWT, forgetting, heat map);
- ``runner``: trains a stream through the Trainer, checkpoints the whole run after every
  experience and resumes exactly.
"""
