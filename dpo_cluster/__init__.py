"""dpo-cluster: DPO on a Ray cluster (Ray Data, Ray Train + DeepSpeed, Ray Serve)."""

__version__ = "0.1.0"
