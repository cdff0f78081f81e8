"""Ray Serve side of dpo-cluster: serving the base and tuned models and their blind A/B arena."""
