"""Ray Serve side of dpo-cluster: the base and tuned models side by side and their blind A/B arena.

`app` builds the Serve application (model replicas behind one HTTP front), `api` its routes,
`gateway` what the front does between a request and the replicas, `generation` the decode loop
the replicas run, `arena_store` the votes. The arena's votes are kept as the next DPO round's data.
"""
