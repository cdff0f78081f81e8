"""Reference log-probs (`reference.mode: precompute`): scored by an actor pool, cached by position.

The reference is frozen, so log pi_ref(y|x) of every pair is a fixed number: it is computed once
per pair, outside the training workers, which then load no reference model.

    schedule     which pairs a run reads, in the order it first reads them (`scoring_order`)
    scorer       the actor pool (`ReferenceScorer`, `PositionScorer`, `score_items`)
    cache        the cache key, its directory and manifest, reference_report.json
    values       fragments by row position, and the workers' reader (`ReferenceValues`)
    precompute   the stage, before training or beside it (`build_reference_stage`, `compute_reference_logps`)
"""
