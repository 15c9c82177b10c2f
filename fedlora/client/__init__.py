"""What a site runs: the ClientApp, its cached runtime and local data."""
