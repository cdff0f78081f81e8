"""Starting the serving app from Python: `dpo-cluster serve`, the demo, tests and benchmarks.

Joins the Ray cluster named by RAY_ADDRESS (else starts a local one), starts Serve's HTTP proxy on
serve.host:serve.port and deploys `build_app(config)` as the application "dpo-cluster" at "/".
"""

from __future__ import annotations

from dataclasses import dataclass

from dpo_cluster.config import Config


@dataclass(frozen=True)
class ServingUrls:
    base: str

    @property
    def arena(self) -> str:
        return f"{self.base}/arena"

    @property
    def compare(self) -> str:
        return f"{self.base}/v1/compare"

    @property
    def openai(self) -> str:
        return f"{self.base}/v1"


def start_serving(config: Config) -> ServingUrls:
    """Deploy the app and return its URLs once every replica is up (models loaded)."""
    from ray import serve

    from dpo_cluster.ray_session import ensure_ray
    from dpo_cluster.serving.app import APP_NAME, build_app

    app = build_app(config)  # fails on a bad config before anything starts
    ensure_ray()
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if config.serve.host in ("0.0.0.0", "::") else config.serve.host
    return ServingUrls(base=f"http://{host}:{config.serve.port}")


def stop_serving() -> None:
    from ray import serve

    from dpo_cluster.serving.app import APP_NAME

    serve.delete(APP_NAME)
