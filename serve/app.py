"""Import path of the serving app for `serve run`, `serve deploy` and a RayService's
serveConfigV2: `serve.app:app_builder` (args: a dpo-cluster `config`, `overrides`, or serve.*
keys such as `base`, `tuned`, `api_key_file`). The application itself lives in
`dpo_cluster.serving.app`, so `dpo-cluster serve` and an installed package use the same code.

    serve run serve/config.yaml
"""

from dpo_cluster.serving.app import app_builder, build_app

__all__ = ["app_builder", "build_app"]
