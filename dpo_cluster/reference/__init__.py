"""Reference log-probs (`reference.mode: precompute`): scored by an actor pool, cached, streamed.

The reference is frozen, so log pi_ref(y|x) of every pair is a fixed number: it is computed once
per pair, outside the training workers, which then load no reference model.

    scorer       the actor pool (`ReferenceScorer`, `score_rows`, `build_reference_spec`)
    cache        the cache key, plan, staging, seal and install under output_dir/reference_logps/
    precompute   the pre-pass before training (`compute_reference_logps`)
    stream       the same pool beside training (`start_streamed_reference`, `LogPairSource`)
"""
