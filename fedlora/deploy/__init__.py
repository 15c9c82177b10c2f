"""Deployment tooling: certificates, the site registry, the Fleet-only proxy, process supervision,
the site worker, and the `fedlora coordinator / site / run` commands. Apart from the runtime:
nothing in fedlora.server, fedlora.client or below imports this package."""
