"""The dpo-cluster Ray Serve application, as Serve config files and RayService import it."""
